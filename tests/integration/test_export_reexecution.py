"""The object store goes away during export: the run fails cleanly with nothing published,
and Dagster re-execution from the failure publishes the batch exactly once."""

import json

import pytest
from dagster import (
    DagsterRunStatus,
    ReexecutionOptions,
    execute_job,
    instance_for_test,
    reconstructable,
)

from libs.lake import completion_key
from tests.integration.faulty_proxy import FaultyProxy
from tests.integration.pipeline import land_sample, request_for, sensor_tick
from tests.integration.reexecutable import ingest_batch_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_store_down_during_export_then_reexecution_publishes_once(
        stack_env, store, landing_store, tmp_path, batch_id, monkeypatch):
    host, port = stack_env["MINIO_ENDPOINT"].split(":")
    proxy = FaultyProxy(host, int(port))
    # every resource of the run reaches the object store through the proxy
    monkeypatch.setenv("MINIO_ENDPOINT", proxy.endpoint)
    try:
        land_sample(landing_store, tmp_path, batch_id, n_points=40_000)
        with instance_for_test() as instance:
            request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
            config = json.loads(json.dumps(request.run_config))
            config["ops"]["shard_batch"] = {"config": {"chunk_rows": 10_000}}
            # the plug is pulled right after load_and_join has stored its output: the
            # export step is the first to find the object store gone
            proxy.go_down_after(b"/load_and_join/result.json")
            failed = execute_job(reconstructable(ingest_batch_job), instance, run_config=config,
                                 tags=request.tags)
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
    finally:
        proxy.close()
    manifest = json.loads(store.get_bytes("data-lake", completion_key(batch_id)))
    assert manifest["datasets"]["points"]["rows"] == 40_000
    for entry in manifest["datasets"].values():
        listed = sorted(o.key for o in store.list("data-lake", entry["prefix"]))
        assert listed == sorted(o["key"] for o in entry["objects"]), "no duplicates, no orphans"
