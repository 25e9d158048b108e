"""Run monitoring under the real daemon: runs lost with their code server in every stage are
failed by their missing heartbeat within a minute, recorded in the ledger with their cause,
their schemas dropped, the queue moves on, and re-execution from failure publishes each once;
a run past its max runtime (hung: it still beats) is stopped and failed (the hang case).

The test owns its code server (the stack's own ``up --dagster`` one would also pick up the
batches this test lands) and its daemon, over an instance configured exactly as devstack's.
"""

import hashlib
import json
import time
from pathlib import Path

import pytest
from dagster import (
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    ReexecutionOptions,
    RunsFilter,
    execute_job,
    reconstructable,
)

from etl_pipelines.resources.limits import MAX_RUNTIME_TAG
from libs import postgis
from libs.lake import completion_key
from libs.ledger import PROCESS_LOST_CAUSE
from tests.integration.daemon_harness import OwnDagster, wait_for
from tests.integration.monitored_defs import STAGES
from tests.integration.pipeline import land_sample
from tests.integration.reexecutable import ingest_batch_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODULE = "tests.integration.monitored_defs"
PORT = 54123  # not the stack's code server (54000)
#: Killed in the first round, one run per slot of the instance's four; publish goes second.
KILL_FIRST = ("shard", "transform", "load", "join")
#: Queued behind them: a run killed in publish, one that hangs (in transform), a clean one.
SECOND = ("publish", "hang", "clean")
N_POINTS = 3_000
#: devstack's heartbeat_timeout_seconds (30) + poll_interval_seconds (5), and slack for a
#: loaded 2-core machine (the monitor's poll itself, the launcher's storage reads).
DETECTION_BOUND_S = 30 + 5 + 25


class MonitoredDagster(OwnDagster):
    """The test location ``monitored_defs`` (its pause points, its max runtime) on a fresh
    instance whose dagster.yaml is devstack's, run monitoring included."""

    def __init__(self, home: Path, logs: Path, max_run_seconds: int) -> None:
        self.pause_plan = logs / "pauses" / "plan.json"
        self.pause_plan.parent.mkdir()
        self.plan_pauses({})
        super().__init__(home, logs, module=MODULE, port=PORT, env={
            "MONITORED_MAX_RUN_SECONDS": str(max_run_seconds),
            "MONITORED_PAUSE_PLAN": str(self.pause_plan)})

    def plan_pauses(self, plan: dict[str, str]) -> None:
        """Runs of these batch ids pause in these stages (``monitored_defs.STAGES``)."""
        self.pause_plan.write_text(json.dumps(plan))

    def paused_in(self, batch_id: str) -> str | None:
        """The stage the run of ``batch_id`` is paused in, if it is."""
        marker = self.pause_plan.parent / f"{batch_id}.paused"
        return json.loads(marker.read_text())["stage"] if marker.exists() else None


@pytest.fixture
def monitored(request, tmp_path, stack_env):
    dagster = MonitoredDagster(tmp_path / "dagster_home", tmp_path, request.param)
    yield dagster
    dagster.stop()


def _the_run(instance: DagsterInstance, batch_id: str):
    runs = instance.get_runs(RunsFilter(tags={"batch_id": batch_id}))
    return runs[0] if runs else None


def _started_steps(instance: DagsterInstance, run_id: str) -> set[str]:
    return {e.step_key for e in instance.all_logs(run_id, of_type=DagsterEventType.STEP_START)}


def _schemas(pg) -> set[str]:
    return {r[0] for r in pg.execute("SELECT nspname FROM pg_namespace").fetchall()}


def _ledger_run(ledger, run_id: str) -> dict | None:
    record = ledger.run(run_id)
    return record if record and record.get("status") == "FAILURE" else None


def _wait_failed_by_heartbeat(instance, runs, killed_at: float, diagnose) -> None:
    """Each of ``runs`` (killed at ``killed_at``) is FAILURE, by the heartbeat check, within
    DETECTION_BOUND_S of the kill."""
    for run in runs:
        record = wait_for(lambda r=run: (rec := instance.get_run_record_by_id(r.run_id))
                          .dagster_run.is_finished and rec, 300, diagnose, interval=1)
        assert record.dagster_run.status == DagsterRunStatus.FAILURE, record.dagster_run.status
        messages = [e.message or "" for e in instance.all_logs(run.run_id)]
        assert any("no heartbeat from the run worker" in m for m in messages), messages[-5:]
        took = record.end_time - killed_at
        assert took <= DETECTION_BOUND_S, f"{run.run_id} failed {took:.0f} s after the kill"


def _rows(manifest: dict) -> dict[str, int]:
    return {dataset: entry["rows"] for dataset, entry in manifest["datasets"].items()}


def _assert_lake_holds_exactly(store, manifest: dict) -> None:
    for entry in manifest["datasets"].values():
        listed = sorted(o.key for o in store.list("data-lake", entry["prefix"]))
        assert listed == sorted(o["key"] for o in entry["objects"]), "no duplicates, no orphans"
        for obj in entry["objects"]:
            digest = hashlib.sha256(store.get_bytes("data-lake", obj["key"])).hexdigest()
            assert digest == obj["sha256"], obj["key"]


@pytest.mark.parametrize("monitored", [1800], indirect=True)
def test_runs_killed_in_every_stage_are_failed_fast_recorded_and_reexecute_once(
        monitored, store, landing_store, ledger, pg, tmp_path, batch_id):
    """Five runs, each killed (its process with the code server's whole tree, what a lost
    user-code container does) while paused inside its stage: shard, transform, load, join
    (round 1, the instance's four run slots) and publish (round 2, queued behind them with a
    run that hangs and a clean batch). Each killed run is failed by its missing heartbeat
    within DETECTION_BOUND_S (its max runtime is 30 minutes), the hung one by its max runtime;
    the ledger gives the cause, the queued batches start, no run schema remains, and
    re-execution from failure publishes each batch once, as the clean batch was published."""
    ids = {stage: f"{batch_id}-{stage}" for stage in (*STAGES, "hang", "clean")}
    monitored.plan_pauses({**{ids[stage]: stage for stage in STAGES}, ids["hang"]: "transform"})
    monitored.start(skip_existing_manifests_of=store, focus=batch_id)
    instance = DagsterInstance.from_config(str(monitored.home))

    def diagnose() -> str:
        return monitored.log_tail("daemon") + "\n---\n" + monitored.log_tail("code-server")

    for stage in KILL_FIRST:
        land_sample(landing_store, tmp_path, ids[stage], n_points=N_POINTS)
    paused = wait_for(lambda: all(monitored.paused_in(ids[s]) for s in KILL_FIRST) and
                      {s: monitored.paused_in(ids[s]) for s in KILL_FIRST}, 420, diagnose)
    assert paused == {s: s for s in KILL_FIRST}, paused
    for stage in SECOND:
        land_sample(landing_store, tmp_path, ids[stage], n_points=N_POINTS)
    wait_for(lambda: all((r := _the_run(instance, ids[s])) and r.status == DagsterRunStatus.QUEUED
                         for s in SECOND), 120, diagnose)
    runs = {stage: _the_run(instance, ids[stage]) for stage in KILL_FIRST}
    assert all(r.status == DagsterRunStatus.STARTED for r in runs.values()), runs

    killed_at = time.time()
    killed = monitored.kill_code_server_tree()
    assert len(killed) >= 2 + len(KILL_FIRST), f"code server, gRPC server, run workers: {killed}"
    monitored.start_code_server()  # devstack's `up --dagster` would: the same, by hand
    _wait_failed_by_heartbeat(instance, runs.values(), killed_at, diagnose)

    # the slots are free: the queued batches start; the clean one is published
    wait_for(lambda: monitored.paused_in(ids["publish"]) == "publish", 300, diagnose)
    wait_for(lambda: monitored.paused_in(ids["hang"]) == "transform", 300, diagnose)
    clean = wait_for(lambda: (r := _the_run(instance, ids["clean"])) and r.is_finished and r,
                     300, diagnose)
    assert clean.status == DagsterRunStatus.SUCCESS, clean.status
    # the hung run still beats: its max runtime (shortened now, as a user may) stops it
    runs["hang"] = _the_run(instance, ids["hang"])
    assert runs["hang"].tags[MAX_RUNTIME_TAG] == "1800", "the sensor's tag"
    instance.add_run_tags(runs["hang"].run_id, {MAX_RUNTIME_TAG: "1"})
    hung = wait_for(lambda: (r := instance.get_run_by_id(runs["hang"].run_id)).is_finished and r,
                    120, diagnose)
    assert hung.status == DagsterRunStatus.FAILURE, hung.status
    runs["publish"] = _the_run(instance, ids["publish"])
    killed_at = time.time()
    monitored.kill_code_server_tree()
    monitored.start_code_server()  # the ledger's failure sensor and the janitor run there
    _wait_failed_by_heartbeat(instance, [runs["publish"]], killed_at, diagnose)

    for stage, run in runs.items():
        record = wait_for(lambda r=run: _ledger_run(ledger, r.run_id), 300, diagnose, interval=2)
        if stage == "hang":
            assert "maximum runtime" in record["cause"], record
        else:
            assert record["cause"] == PROCESS_LOST_CAUSE, record
        assert record["batch_id"] == ids[stage]
        assert not store.exists("data-lake", completion_key(ids[stage])), stage
    schemas = {postgis.run_schema_name(run.run_id) for run in runs.values()}
    wait_for(lambda: not schemas & _schemas(pg), 180, diagnose)

    reference = json.loads(store.get_bytes("data-lake", completion_key(ids["clean"])))
    assert _rows(reference)["points"] == N_POINTS
    for stage, run in runs.items():
        # in this process; a larger max runtime tag overrides the parent's
        again = execute_job(reconstructable(ingest_batch_job), instance,
                            reexecution_options=ReexecutionOptions.from_failure(run.run_id,
                                                                                instance),
                            tags={MAX_RUNTIME_TAG: "1800"})
        assert again.success, stage
        manifest = json.loads(store.get_bytes("data-lake", completion_key(ids[stage])))
        assert manifest["run_id"] == again.run_id
        assert _rows(manifest) == _rows(reference), stage
        _assert_lake_holds_exactly(store, manifest)
        children = [r.run_id for r in instance.get_runs() if r.parent_run_id == run.run_id]
        assert children == [again.run_id], stage
