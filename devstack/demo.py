"""The demo: land the sample batch, let the Dagster daemon's sensor start the run, wait, show
the lake. Expects the stack with Dagster (``python -m devstack up --dagster``; scripts/demo.sh
starts it): ``.venv/bin/python -m devstack.demo [--points N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from devstack.envfile import read_env_file
from devstack.layout import ENV_FILE


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000, help="synthetic points to land")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the run")
    args = parser.parse_args()
    os.environ.update(read_env_file(ENV_FILE))

    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    from devstack.s3 import store_settings
    from libs.lake import completion_key
    from libs.landing import land_batch
    from libs.object_store import ObjectStore
    from libs.sample_batch import write_sample_batch

    # As a data team lands and a consumer reads: neither is the pipeline's identity.
    landing = ObjectStore(store_settings(os.environ, "landing"))
    lake = ObjectStore(store_settings(os.environ, "lake-reader"))
    batch_id = "demo-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / batch_id
        print(f"writing sample batch {batch_id}: {args.points:,} synthetic points + "
              "177 Natural Earth countries")
        write_sample_batch(folder, batch_id, n_points=args.points)
        keys = land_batch(landing, folder, batch_id)
    print("landed: " + ", ".join(f"s3://landing-zone/{k}" for k in keys))
    print("waiting for the manifest sensor (evaluated by the Dagster daemon) to start the run…")

    instance = DagsterInstance.get()
    deadline = time.monotonic() + args.timeout
    run = None
    last_status = None
    while time.monotonic() < deadline:
        runs = instance.get_runs(RunsFilter(tags={"batch_id": batch_id}), limit=1)
        run = runs[0] if runs else None
        if run is not None and run.status != last_status:
            print(f"run {run.run_id}: {run.status.value}")
            last_status = run.status
        if run is not None and run.is_finished:
            break
        time.sleep(2)
    else:
        print(f"timed out after {args.timeout:.0f}s; see the Dagster UI", file=sys.stderr)
        return 1
    ui = os.environ.get("DAGSTER_WEBSERVER_URL", "http://127.0.0.1:3000")
    if run.status != DagsterRunStatus.SUCCESS:
        print(f"run {run.status.value}: {ui}/runs/{run.run_id}", file=sys.stderr)
        return 1

    completion = json.loads(lake.get_bytes("data-lake", completion_key(batch_id)))
    print(f"\nlake s3://data-lake (batch {batch_id}):")
    for dataset, entry in completion["datasets"].items():
        print(f"  {dataset:<22} {entry['rows']:>10,} rows  s3://data-lake/{entry['prefix']}")
        for obj in entry["objects"]:
            print(f"      {obj['key']}  {obj['bytes']:,} bytes  {obj['rows']:,} rows")
    print(f"  completion manifest    s3://data-lake/{completion_key(batch_id)}")
    started = instance.get_run_stats(run.run_id)
    if started.start_time and started.end_time:
        print(f"\nrun took {started.end_time - started.start_time:.1f}s")
    print(f"Dagster UI:     {ui}/runs/{run.run_id}")
    print(f"Ray dashboard:  {os.environ.get('RAY_DASHBOARD_URL', 'http://127.0.0.1:8265')}"
          "  (it asks for a token: RAY_AUTH_TOKEN in .state/stack.env)")
    print("stop the stack with: .venv/bin/python -m devstack down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
