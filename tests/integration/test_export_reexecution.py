"""The object store goes away during export: the run fails cleanly with nothing published,
and Dagster re-execution from the failure publishes the batch exactly once; two re-executions
of one failed run at once leave a lake that its completion manifest describes exactly."""

import hashlib
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
from dagster import (
    DagsterInstance,
    DagsterRunStatus,
    ReexecutionOptions,
    execute_job,
    instance_for_test,
    reconstructable,
)

from libs.lake import completion_key, run_prefix
from tests.integration.faulty_proxy import FaultyProxy
from tests.integration.pipeline import land_sample, request_for, sensor_tick
from tests.integration.reexecutable import ingest_batch_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def proxy(stack_env, monkeypatch):
    """A proxy in front of the object store that every resource of the run goes through."""
    host, port = stack_env["MINIO_ENDPOINT"].split(":")
    proxy = FaultyProxy(host, int(port))
    monkeypatch.setenv("MINIO_ENDPOINT", proxy.endpoint)
    yield proxy
    proxy.close()


def _run_until_the_store_goes(instance, proxy, batch_id: str, *, chunk_rows: int,
                              after: bytes):
    """The sensor's run of ``batch_id``, with the object store gone once a request for a key
    ending in ``after`` has gone through."""
    request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
    config = json.loads(json.dumps(request.run_config))
    config["ops"]["shard_batch"] = {"config": {"chunk_rows": chunk_rows}}
    proxy.go_down_after(after)
    return execute_job(reconstructable(ingest_batch_job), instance, run_config=config,
                       tags=request.tags)


def test_store_down_during_export_then_reexecution_publishes_once(
        store, landing_store, tmp_path, batch_id, proxy):
    land_sample(landing_store, tmp_path, batch_id, n_points=40_000)
    with instance_for_test() as instance:
        # the plug is pulled right after load_and_join has stored its output: the
        # export step is the first to find the object store gone
        failed = _run_until_the_store_goes(instance, proxy, batch_id, chunk_rows=10_000,
                                           after=b"/load_and_join/result.json")
        assert not failed.success
        failure = next(e for e in failed.all_events if e.event_type_value == "STEP_FAILURE")
        assert failure.step_key == "publish_batch"
        assert not store.exists("data-lake", completion_key(batch_id))

        proxy.bring_up()
        again = execute_job(
            reconstructable(ingest_batch_job), instance,
            reexecution_options=ReexecutionOptions.from_failure(failed.run_id, instance))
        assert again.success
        run = instance.get_run_by_id(again.run_id)
        assert run.status == DagsterRunStatus.SUCCESS and run.parent_run_id == failed.run_id
        steps = {e.step_key for e in again.all_events if e.event_type_value == "STEP_SUCCESS"}
        assert steps == {"publish_batch"}, "only the failed step runs again"
    manifest = json.loads(store.get_bytes("data-lake", completion_key(batch_id)))
    assert manifest["datasets"]["points"]["rows"] == 40_000
    for entry in manifest["datasets"].values():
        listed = sorted(o.key for o in store.list("data-lake", entry["prefix"]))
        assert listed == sorted(o["key"] for o in entry["objects"]), "no duplicates, no orphans"


def test_two_concurrent_reexecutions_leave_a_consistent_lake(
        store, landing_store, tmp_path, batch_id, proxy):
    """A run fails after transform; two re-executions from that failure run at once (load,
    join, publish). Each stages under its own run's prefix (they used to share the failed
    run's, writing the same join-result keys); whichever switches the completion manifest
    second either publishes over the first or, if it read the manifest before the first's
    switch, fails saying so and removes its own parts. Either way the manifest lists only
    objects that exist with matching sha256, and the lake holds nothing else."""
    land_sample(landing_store, tmp_path, batch_id, n_points=20_000)
    with instance_for_test() as instance:
        failed = _run_until_the_store_goes(instance, proxy, batch_id, chunk_rows=5_000,
                                           after=b"/transform_chunks/result.json")
        assert not failed.success
        proxy.bring_up()

        # two processes, as two run workers would be (Dagster's in-process execution is
        # not thread-safe: two in one process deadlock on its logging set-up)
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=2, mp_context=spawn) as pool:
            run_ids = list(pool.map(_reexecute, [instance.get_ref()] * 2,
                                    [failed.run_id] * 2))
        results = [instance.get_run_by_id(run_id) for run_id in run_ids]
        succeeded = {r.run_id for r in results if r.status == DagsterRunStatus.SUCCESS}
        assert succeeded, [r.status for r in results]
        for result in results:
            if result.run_id not in succeeded:  # only a lost race fails one, at the switch
                [failure] = [e.dagster_event for e in instance.all_logs(result.run_id)
                             if e.dagster_event and e.dagster_event.event_type_value
                             == "STEP_FAILURE"]
                assert failure.step_key == "publish_batch"
                assert "another run published" in str(failure.event_specific_data)
    manifest = json.loads(store.get_bytes("data-lake", completion_key(batch_id)))
    assert manifest["run_id"] in succeeded
    assert manifest["datasets"]["points"]["rows"] == 20_000
    for entry in manifest["datasets"].values():
        for obj in entry["objects"]:
            data = store.get_bytes("data-lake", obj["key"])
            assert hashlib.sha256(data).hexdigest() == obj["sha256"], obj["key"]
        dataset_folder = entry["prefix"].rsplit("/", 2)[0] + "/"  # <dataset>/<batch_id>/
        listed = sorted(o.key for o in store.list("data-lake", dataset_folder))
        assert listed == sorted(o["key"] for o in entry["objects"]), "no orphans, no duplicates"
    for run_id in succeeded:
        assert list(store.list("etl-staging", run_prefix(run_id))) == [], "staging removed"


def _reexecute(instance_ref, failed_run_id: str) -> str:
    """Re-execute ``failed_run_id`` from its failure in this process; returns the new run id."""
    with DagsterInstance.from_ref(instance_ref) as instance:
        return execute_job(
            reconstructable(ingest_batch_job), instance, raise_on_error=False,
            reexecution_options=ReexecutionOptions.from_failure(failed_run_id, instance)).run_id
