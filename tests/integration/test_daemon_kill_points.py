"""Exactly one run per batch id when the daemon is SIGKILLed at each point of a sensor tick
(before the claim, after the claim, after the run request is stored) and restarted; in the
after-claim case the manifest is replaced while the daemon is down (issue 26).

One code server (tests.integration.kill_point_defs: the manifest sensor wrapped with kill
points), one instance, four daemon lives for the three cases; the instance's run queue
launches nothing (max_concurrent_runs 0): a run in the run storage is the proof, the job
need not run. ~65 s.
"""

import time

import pytest
from dagster import DagsterInstance, RunsFilter

from etl_pipelines.sensors.manifests import INSTANCE_ID_KEY
from libs.manifest import MANIFEST_FILENAME
from tests.integration.daemon_harness import OwnDagster, wait_for
from tests.integration.kill_points import arm
from tests.integration.pipeline import land_sample

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PORT = 54124  # neither the stack's code server (54000) nor test_run_monitoring's
QUEUE_ONLY = """
run_coordinator:
  module: tests.integration.kill_points
  class: KillingRunCoordinator
  config:
    max_concurrent_runs: 0
"""


def _runs(instance: DagsterInstance, batch_id: str):
    return instance.get_runs(RunsFilter(tags={"batch_id": batch_id}))


def _finished_ticks_since(instance: DagsterInstance, since: float) -> int:
    [state] = [s for s in instance.all_instigator_state()
               if s.instigator_name == "manifest_sensor"]
    ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=20)
    return sum(1 for t in ticks if t.timestamp > since
               and t.status.value in ("SUCCESS", "SKIPPED"))


def test_a_daemon_killed_at_each_point_of_a_tick_starts_exactly_one_run_per_batch(
        store, landing_store, ledger, tmp_path, batch_id, stack_env):
    kill_file = tmp_path / "kill-point.json"
    dagster = OwnDagster(tmp_path / "dagster_home", tmp_path,
                         module="tests.integration.kill_point_defs", port=PORT,
                         env={"KILL_POINT_FILE": str(kill_file)}, extra_yaml=QUEUE_ONLY)
    try:
        dagster.start_sensor(skip_existing_manifests_of=store, focus=batch_id)
        dagster.start_code_server()
        instance = DagsterInstance.from_config(str(dagster.home))

        replaced: dict[str, str] = {}

        def replace_manifest(batch: str) -> None:
            assert ledger.batch(batch)["etag"], "claimed before the kill"
            assert _runs(instance, batch) == []
            land_sample(landing_store, tmp_path / "v2", batch, n_points=10,
                        edit=lambda m: m)  # rewritten compact: another ETag
            replaced[batch] = store.stat("landing-zone", f"{batch}/{MANIFEST_FILENAME}").etag

        # one daemon life per kill: armed for the batch about to land, killed by the tick
        # (or the run submission) that reaches the point with it, restarted
        daemon = dagster.start_daemon()
        cases = {point: f"{batch_id}-{n}" for n, point in
                 enumerate(("before_claim", "after_claim", "after_run_stored"))}
        for point, batch in cases.items():
            arm(kill_file, point, batch, daemon.pid)
            land_sample(landing_store, tmp_path / "v1", batch, n_points=10)
            code = wait_for(lambda d=daemon: d.poll(), 180, dagster.log_tail, interval=0.5)
            assert code == -9 and not kill_file.exists(), f"{point}: exit {code}"
            if point == "after_claim":
                replace_manifest(batch)
            if point == "after_run_stored":
                assert len(_runs(instance, batch)) == 1, "stored before the kill"
            else:
                assert _runs(instance, batch) == [], f"{point}: no run before the restart"
            daemon = dagster.start_daemon()
            wait_for(lambda b=batch: _runs(instance, b), 180, dagster.log_tail, interval=0.5)
        assert ledger.batch(cases["after_claim"])["etag"] == replaced[cases["after_claim"]]

        # two whole ticks after every batch has its run: nothing more is requested
        restarted = time.time()
        wait_for(lambda: _finished_ticks_since(instance, restarted) >= 2, 120, dagster.log_tail)
        me = instance.run_storage.get_cursor_values({INSTANCE_ID_KEY})[INSTANCE_ID_KEY]
        for point, batch in cases.items():
            [run] = _runs(instance, batch)
            assert run.tags["dagster/run_key"] == batch, point
            claim = ledger.batch(batch)
            assert claim["claimed_by"]["instance"] == me, (point, claim["claimed_by"])
            assert claim["claim_token"] == run.tags["spatial-etl/claim-token"], point
    finally:
        dagster.stop()
