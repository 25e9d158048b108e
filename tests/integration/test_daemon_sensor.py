"""The real Dagster daemon evaluates the manifest sensor and launches the run."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from devstack.layout import REPO
from devstack.procs import reset_signals, terminate_tree
from libs.lake import completion_key
from libs.manifest import MANIFEST_FILENAME
from tests.integration.pipeline import land_sample

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAGSTER_BIN = Path(sys.executable).parent


@pytest.fixture
def dagster_home(tmp_path, stack_env):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return home


def test_daemon_sensor_launches_a_run_that_publishes(store, landing_store, tmp_path, batch_id, dagster_home):
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home)}
    # Everything already in the landing zone counts as processed for this fresh instance,
    # so its daemon only reacts to the batch this test lands.
    processed = {o.key: o.etag for o in store.list("landing-zone")
                 if o.key.endswith("/" + MANIFEST_FILENAME)}
    cursor = json.dumps({"version": 1, "processed": processed})
    for args in (["cursor", "manifest_sensor", "--set", cursor],
                 # a stored cursor creates a stopped sensor state, overriding the default
                 ["start", "manifest_sensor"]):
        subprocess.run([DAGSTER_BIN / "dagster", "sensor", *args, "-m", "etl_pipelines.definitions"],
                       cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
    log = open(tmp_path / "daemon.log", "wb")
    daemon = subprocess.Popen(
        [DAGSTER_BIN / "dagster-daemon", "run", "-m", "etl_pipelines.definitions"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=reset_signals,
        start_new_session=True)
    try:
        land_sample(landing_store, tmp_path, batch_id, n_points=5_000)
        instance = DagsterInstance.from_config(str(dagster_home))
        deadline = time.monotonic() + 300
        run = None
        while time.monotonic() < deadline:
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            runs = instance.get_runs(RunsFilter(tags={"batch_id": batch_id}))
            run = runs[0] if runs else None
            if run is not None and run.is_finished:
                break
            time.sleep(2)
        assert run is not None, "the daemon launched no run:\n" + \
            (tmp_path / "daemon.log").read_text()[-3000:]
        assert run.status == DagsterRunStatus.SUCCESS, run.status
        assert run.tags["dagster/run_key"] == batch_id
        assert len(instance.get_runs(RunsFilter(tags={"batch_id": batch_id}))) == 1
        assert store.exists("data-lake", completion_key(batch_id))
        # the daemon stored the version 3 cursor: the listing resumes from a position
        [state] = [s for s in instance.all_instigator_state() if s.name == "manifest_sensor"]
        stored = json.loads(state.instigator_data.cursor)
        assert stored["version"] == 3 and stored["position"]["after"], stored["position"]
        assert f"{batch_id}/{MANIFEST_FILENAME}" in stored["processed"]
    finally:
        terminate_tree(daemon.pid, timeout=30, signal_group=True)
        daemon.wait()
        log.close()
