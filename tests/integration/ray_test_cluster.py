"""A separate two-node Ray cluster for the multi-node tests, and how to run a batch on it.

The cluster is ours alone: its own state dir and temp dir, its own port block (GCS 26479,
dashboard 26569, every other port in 26479..26578), a head with one CPU and one worker node
(its own raylet) with one CPU; started and stopped by PID through devstack.ray_nodes. The
stack's Ray (56379) is never touched.

The block lies below Linux's ephemeral port range (32768-60999): the cluster starts in the
middle of the suite, when hundreds of client sockets to the object store sit in TIME_WAIT or
are open on random local ports, and in the old block (56479..) one of them now and then held
a port a raylet or agent had to bind ("The current node timed out during startup").
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import geopandas as gpd
import pandas as pd
from dagster import DagsterInstance, RunRequest

from devstack.ray_layout import RayHead
from devstack.ray_nodes import dashboard_request, running_cluster
from libs.lake import completion_key
from libs.object_store import ObjectStore
from tests.integration.pipeline import land_sample, request_for, run_ingest, sensor_tick

TEST_GCS_PORT = 26479
N_POINTS = 50_000
#: 20 point chunks (+ 1 countries chunk): enough to keep two 1-CPU nodes busy
CHUNK_ROWS = 2_500


@contextmanager
def two_node_cluster(state_dir: Path, workers: int = 1) -> Iterator[RayHead]:
    head = RayHead.port_block(state_dir, TEST_GCS_PORT, num_cpus=1, worker_num_cpus=1)
    with running_cluster(head, workers) as running:
        yield running


@contextmanager
def ray_address(address: str, dashboard_url: str) -> Iterator[None]:
    """Point the pipeline's RayResource (EnvVar RAY_ADDRESS, RAY_DASHBOARD_URL) elsewhere."""
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when imported: imported before the
    # stack's environment was loaded, it rewrites 127.0.0.1 to the external IP and ray.init
    # hangs. Fail here instead.
    ray = sys.modules.get("ray")
    if ray is not None:
        from ray._private import ray_constants

        assert not ray_constants.ENABLE_RAY_CLUSTER, (
            "ray was imported before the stack's environment (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
            "=0) was loaded: import ray lazily, after the stack_env fixture")
        assert not ray.is_initialized(), "this process is still connected to some Ray"
    saved = {key: os.environ.get(key) for key in ("RAY_ADDRESS", "RAY_DASHBOARD_URL")}
    os.environ.update({"RAY_ADDRESS": address, "RAY_DASHBOARD_URL": dashboard_url})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def land_and_run(store: ObjectStore, tmp: Path, batch_id: str, instance: DagsterInstance,
                 *, n_points: int = N_POINTS, chunk_rows: int = CHUNK_ROWS, edit=None,
                 **run_kwargs):
    """Land the sample batch (``edit`` may change its manifest), let the sensor request it,
    run it with small chunks."""
    land_sample(store, tmp, batch_id, n_points=n_points, edit=edit)
    request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
    assert request is not None, f"the sensor did not request a run for {batch_id}"
    config = dict(request.run_config)
    config["ops"] = {**config["ops"], "shard_batch": {"config": {"chunk_rows": chunk_rows}}}
    return run_ingest(instance, RunRequest(run_key=request.run_key, run_config=config,
                                           tags=request.tags), **run_kwargs)


def run_in_own_process(batch_id: str, folder: Path, address: str, dashboard_url: str) -> dict:
    """Land and run a batch in a fresh Python process pointed at ``address``, as Dagster's run
    launcher does (one process per run); returns ``summarize_run``'s dict.

    Needed where driver-side Ray metrics are checked: in Ray 2.60 a process that calls
    ``ray.init`` again after ``ray.shutdown`` exports every later counter increment once per
    earlier session (a metric reader leaks per init), so a pytest process that already ran
    other Ray tests would report multiples of the true counts.
    """
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_DASHBOARD_URL": dashboard_url}
    done = subprocess.run([sys.executable, "-m", __name__, batch_id, str(folder)], env=env,
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize_run(result, instance: DagsterInstance) -> dict:
    """What the metrics test needs from a run, as JSON-able values."""
    return {"success": result.success, "run_id": result.run_id,
            "metadata": {step: output_metadata(result, step) for step in
                         ("shard_batch", "transform_chunks", "load_and_join")},
            "messages": [e.user_message for e in instance.all_logs(result.run_id)]}


def output_metadata(result, step: str) -> dict:
    """The output metadata ``step`` recorded, as plain values."""
    for event in result.events_for_node(step):
        if event.is_successful_output:
            return {key: value.value for key, value in event.step_output_data.metadata.items()}
    raise AssertionError(f"{step} produced no output")


def lake_dataset(store: ObjectStore, batch_id: str, dataset: str, sort_by: str) -> gpd.GeoDataFrame:
    """A published dataset, every object concatenated, sorted by ``sort_by``."""
    completion = json.loads(store.get_bytes("data-lake", completion_key(batch_id)))
    frames = [gpd.read_parquet(io.BytesIO(store.get_bytes("data-lake", o["key"])))
              for o in completion["datasets"][dataset]["objects"]]
    frame = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=frames[0].crs)
    return frame.sort_values(sort_by, kind="stable").reset_index(drop=True)


def state_tasks(head: RayHead, key: str, value: str) -> list[dict]:
    """Every task attempt whose ``key`` equals ``value`` (name, state, node_id, attempt_number,
    worker_pid...), from the cluster's state API.

    Asked over HTTP rather than through ``ray.util.state``, which lets a RAY_ADDRESS in the
    environment override the address it is given.
    """
    query = urllib.parse.urlencode({"limit": 10_000, "detail": 1, "filter_keys": key,
                                    "filter_predicates": "=", "filter_values": value})
    url = f"{head.dashboard_url}/api/v0/tasks?{query}"
    with urllib.request.urlopen(dashboard_request(url), timeout=30) as resp:
        return json.loads(resp.read())["data"]["result"]["result"]


def transform_tasks(head: RayHead, job_id: str, batch_id: str) -> list[dict]:
    """Every attempt of this batch's transform tasks."""
    return [t for t in state_tasks(head, "job_id", job_id)
            if t["name"].startswith(f"transform:{batch_id}:")]


if __name__ == "__main__":  # run_in_own_process: python -m tests.integration.ray_test_cluster
    from devstack.envfile import read_env_file
    from devstack.layout import ENV_FILE

    for _key, _value in read_env_file(ENV_FILE).items():
        os.environ.setdefault(_key, _value)
    from devstack.s3 import store_settings

    _store = ObjectStore(store_settings(os.environ, "landing"))  # lands as a data team
    with DagsterInstance.ephemeral() as _instance:
        _result = land_and_run(_store, Path(sys.argv[2]), sys.argv[1], _instance)
        sys.stdout.write(json.dumps(summarize_run(_result, _instance), default=str) + "\n")
