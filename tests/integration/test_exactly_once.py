"""Exactly once (issue 26), the sensor driven tick by tick on the real store and ledger: claims
are exclusive per Dagster instance, a claim whose run was never stored is requested again,
and a batch reads exactly the landing versions it validated (a re-execution too), or fails
naming what changed. (The daemon killed mid-tick: test_daemon_kill_points.py.)"""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from dagster import (
    DagsterInstance,
    DagsterRun,
    ReexecutionOptions,
    execute_job,
    instance_for_test,
    reconstructable,
)

from etl_pipelines.definitions import defs
from etl_pipelines.sensors.manifests import INSTANCE_ID_KEY, STALE_CLAIM_SECONDS
from libs.ledger import CLAIM_EXPIRES_SECONDS, CLAIM_TOKEN_TAG
from libs.manifest import MANIFEST_FILENAME
from libs.sample_batch import write_sample_batch
from tests.integration.pipeline import land_sample, request_for, requested_nothing, sensor_tick
from tests.integration.reexecutable import ingest_batch_job

pytestmark = pytest.mark.integration


def _instance_id(instance: DagsterInstance) -> str:
    return instance.run_storage.get_cursor_values({INSTANCE_ID_KEY})[INSTANCE_ID_KEY]


def _backdate_claim(ledger, batch_id: str, seconds: float) -> None:
    ledger.db.batches.update_one({"_id": batch_id}, {"$set": {
        "claimed_at": datetime.now(UTC) - timedelta(seconds=seconds)}})


def _validate_only(instance: DagsterInstance, request):
    return defs.resolve_job_def("ingest_batch").execute_in_process(
        run_config=request.run_config, instance=instance, tags=request.tags,
        op_selection=["validate_batch"], raise_on_error=False)


def _failure(result, step: str) -> str:
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == step
    error, messages = failure.event_specific_data.error, []
    while error is not None:  # the op's error, under Dagster's step error when it wraps it
        messages.append(error.message)
        error = error.cause
    return "\n".join(messages)


def test_a_second_instance_sharing_the_ledger_gets_no_run_until_the_claim_expires(
        landing_store, ledger, tmp_path, batch_id):
    land_sample(landing_store, tmp_path, batch_id, n_points=10)
    key = f"{batch_id}/{MANIFEST_FILENAME}"
    with DagsterInstance.ephemeral() as a, DagsterInstance.ephemeral() as b:
        first = request_for(sensor_tick(a, focus=batch_id), batch_id)
        assert ledger.batch(batch_id)["claimed_by"]["instance"] == _instance_id(a)
        other = sensor_tick(b, focus=batch_id)
        assert requested_nothing(other) or request_for(other, batch_id) is None
        assert key not in (getattr(other, "cursor", None) or ""), "looked at again next tick"
        assert ledger.batch(batch_id)["duplicate_claims"][-1]["instance"] == _instance_id(b)
        assert [r["status"] for r in ledger.manifests_for_key(key)] == ["accepted"]
        # the claimant's own next tick (its first result lost) requests the same run again
        again = request_for(sensor_tick(a, focus=batch_id), batch_id)
        assert again.tags[CLAIM_TOKEN_TAG] == first.tags[CLAIM_TOKEN_TAG]

        # a's claim expires with no run started: b takes it over with a new token, and a's
        # request, were it to start late, cannot start a run
        _backdate_claim(ledger, batch_id, CLAIM_EXPIRES_SECONDS + 60)
        taken = request_for(sensor_tick(b, focus=batch_id), batch_id)
        assert taken.tags[CLAIM_TOKEN_TAG] != first.tags[CLAIM_TOKEN_TAG]
        claim = ledger.batch(batch_id)
        assert claim["claimed_by"]["instance"] == _instance_id(b)
        assert claim["taken_over"][0]["from"]["instance"] == _instance_id(a)
        late = _validate_only(a, first)
        assert not late.success and "claim expired unstarted and was taken over by" in \
            _failure(late, "validate_batch")
        assert _validate_only(b, taken).success


def test_a_claim_whose_run_was_never_stored_is_requested_again(landing_store, ledger, tmp_path,
                                                                 batch_id):
    land_sample(landing_store, tmp_path, batch_id, n_points=10)
    with DagsterInstance.ephemeral() as instance:
        first = sensor_tick(instance, focus=batch_id)
        request = request_for(first, batch_id)
        # the tick's cursor was kept but its run request never reached the run storage
        assert requested_nothing(sensor_tick(instance, cursor=first.cursor)), "too fresh"
        _backdate_claim(ledger, batch_id, STALE_CLAIM_SECONDS + 5)
        stale = request_for(sensor_tick(instance, cursor=first.cursor), batch_id)
        assert (stale.run_config, stale.tags) == (request.run_config, request.tags)
        # once a run is in the run storage (queued, not started), it is not requested again
        instance.add_run(DagsterRun(job_name="ingest_batch", run_id=str(uuid.uuid4()),
                                    tags={**stale.tags, "dagster/run_key": batch_id}))
        assert requested_nothing(sensor_tick(instance, cursor=first.cursor))


def test_a_manifest_replaced_after_its_claim_fails_validate_saying_so(
        landing_store, store, ledger, tmp_path, batch_id):
    key = f"{batch_id}/{MANIFEST_FILENAME}"
    land_sample(landing_store, tmp_path / "v1", batch_id, n_points=10)
    with instance_for_test() as instance:
        request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
        claimed = ledger.batch(batch_id)["etag"]
        land_sample(landing_store, tmp_path / "v2", batch_id, n_points=10, edit=lambda m: m)
        now = store.stat("landing-zone", key).etag
        first = execute_job(reconstructable(ingest_batch_job), instance,
                            run_config=request.run_config, tags=request.tags,
                            op_selection=["validate_batch"])
        assert not first.success
        message = _failure(first, "validate_batch")
        assert "was replaced after the manifest sensor claimed it" in message
        assert f"claimed ETag {claimed!r}, now {now!r}" in message
        # the sensor takes the claim over for the new version; then the re-execution (the
        # parent's tags, as the UI copies them) runs
        sensor_tick(instance, focus=batch_id)
        assert ledger.batch(batch_id)["etag"] == now
        again = execute_job(reconstructable(ingest_batch_job), instance, tags=request.tags,
                            reexecution_options=ReexecutionOptions.from_failure(first.run_id,
                                                                                instance))
        assert again.success
    assert ledger.batch(batch_id)["pinned"]["manifest"]["etag"] == now


def test_a_reexecution_reads_the_pinned_versions_or_names_what_changed(
        landing_store, store, ledger, tmp_path, batch_id):
    land_sample(landing_store, tmp_path / "v1", batch_id, n_points=100)
    points = f"{batch_id}/points.fgb"
    pinned = store.stat("landing-zone", points)
    config = {"shard_batch": {"config": {"transform_early": False}}}
    with instance_for_test() as instance:
        request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
        first = execute_job(reconstructable(ingest_batch_job), instance,
                            run_config={"ops": {**request.run_config["ops"], **config}},
                            tags=request.tags, op_selection=["validate_batch", "shard_batch"])
        assert first.success
        pins = ledger.batch(batch_id)["pinned"]
        assert pins["by_run"] == first.run_id
        assert pins["manifest"]["etag"] == store.stat("landing-zone", f"{batch_id}/manifest.json").etag
        assert {(o["key"], o["etag"], o["size"]) for o in pins["objects"]} >= {
            (points, pinned.etag, pinned.size)}

        # the landed points replaced in place (what a data team must not do)
        write_sample_batch(tmp_path / "v2", batch_id, n_points=150)
        landing_store.upload("landing-zone", points, tmp_path / "v2" / "points.fgb",
                             "application/octet-stream")
        now = store.stat("landing-zone", points)
        expected = (f"s3://landing-zone/{points} changed after the batch was validated: pinned "
                    f"ETag {pinned.etag!r} ({pinned.size:,} bytes), now ETag {now.etag!r} "
                    f"({now.size:,} bytes)")
        for step in ("shard_batch", "validate_batch"):
            again = execute_job(reconstructable(ingest_batch_job), instance,
                                reexecution_options=ReexecutionOptions(
                                    parent_run_id=first.run_id, step_selection=[step]))
            assert not again.success
            message = _failure(again, step)
            assert expected in message and "under a new batch_id" in message, message
