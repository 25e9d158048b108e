"""Housekeeping on the real stack: the staging janitor removes what finished runs left after
the retention and never what a live or re-executable run needs; stray lake parts go, listed
ones stay; landing is never touched; a batch too large for the scratch disk fails before any
download. Objects are planted directly (with the pipeline's identity) and runs recorded in an
ephemeral instance, except for one real run that fails on the free-space check."""

import json
import shutil
import uuid

import pytest
from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, build_sensor_context

from etl_pipelines.definitions import build_resources
from etl_pipelines.jobs.ingest import ingest_batch
from etl_pipelines.resources import RetentionResource, ScratchResource
from etl_pipelines.sensors.janitor import staging_janitor
from libs.lake import completion_key
from tests.integration.pipeline import land_sample, request_for, sensor_tick

pytestmark = pytest.mark.integration
STAGING, LAKE = "etl-staging", "data-lake"


@pytest.fixture
def instance():
    with DagsterInstance.ephemeral() as inst:
        yield inst


def _record_run(instance, status: DagsterRunStatus, **tags) -> str:
    run = instance.add_run(DagsterRun(job_name="ingest_batch", run_id=str(uuid.uuid4()),
                                      status=DagsterRunStatus.STARTED, tags=tags))
    if status == DagsterRunStatus.FAILURE:
        instance.report_run_failed(run)  # records its end time, as a failing run does
    return run.run_id


def _plant_staging(store, run_id: str) -> list[str]:
    keys = [f"runs/{run_id}/chunks/points/chunk-00000.parquet",
            f"dagster-io/{run_id}/shard_batch/result.json"]
    for key in keys:
        store.write_bytes(STAGING, key, b"{}", "application/octet-stream")
    return keys


def _tick(instance, retention: RetentionResource, cursor: str | None = None):
    with build_sensor_context(instance=instance, cursor=cursor, resources={
            "object_store": build_resources()["object_store"],
            "retention": retention}) as context:
        return staging_janitor(context)


def _tick_until_idle(instance, retention: RetentionResource) -> None:
    """Retention 0 makes every finished run's leftovers in the shared test stack eligible:
    tick until a tick finds nothing more (each tick is bounded)."""
    for _ in range(50):
        if _tick(instance, retention).skip_reason.skip_message.startswith("removed 0 staging"):
            return
    pytest.fail("the janitor kept finding staging objects to remove after 50 ticks")


def test_staging_of_finished_runs_goes_after_the_retention_never_what_a_run_may_need(
        instance, store, landing_store):
    live = _record_run(instance, DagsterRunStatus.STARTED)
    failed = _record_run(instance, DagsterRunStatus.FAILURE)
    parent = _record_run(instance, DagsterRunStatus.FAILURE)  # re-executed, the child still runs
    child = _record_run(instance, DagsterRunStatus.STARTED, **{
        "dagster/root_run_id": parent, "dagster/parent_run_id": parent})
    unknown = str(uuid.uuid4())  # another instance's run, or one deleted from this one
    keys = {run_id: _plant_staging(store, run_id) for run_id in (live, failed, parent, unknown)}
    landing_key = f"runs/{unknown}/chunks/points/chunk-00000.parquet"
    landing_store.put_bytes("landing-zone", landing_key, b"{}", "application/octet-stream")

    def kept(run_id: str) -> bool:
        return all(store.exists(STAGING, key) for key in keys[run_id])

    _tick(instance, RetentionResource(retention_hours=1))
    assert all(kept(run_id) for run_id in keys), "within the retention nothing goes"

    first = _tick(instance, RetentionResource(retention_hours=0, max_deletions_per_tick=1))
    assert first.skip_reason.skip_message.startswith("removed 1 staging object(s)")
    _tick_until_idle(instance, RetentionResource(retention_hours=0))
    assert not any(store.exists(STAGING, k) for k in keys[failed] + keys[unknown])
    assert kept(live), "a live run's staging"
    assert kept(parent), "what a running re-execution reads from its parent"
    assert store.exists("landing-zone", landing_key), "landing is never touched"

    instance.report_run_failed(instance.get_run_by_id(child))
    _tick_until_idle(instance, RetentionResource(retention_hours=0))
    assert not any(store.exists(STAGING, key) for key in keys[parent])
    assert kept(live)


def test_lake_parts_no_completion_manifest_lists_go_after_the_retention(instance, store):
    dataset = f"janitor-{uuid.uuid4().hex[:8]}"  # its keys sort together: a focused scan
    batch, unpublished, unreadable = "b-published", "b-never-published", "b-unreadable"

    def part(batch_id: str, run_id: str) -> str:
        return f"{dataset}/{batch_id}/{run_id}.{uuid.uuid4().hex[:8]}/part-00000.parquet"

    live_run = _record_run(instance, DagsterRunStatus.STARTED)
    listed, stale = part(batch, str(uuid.uuid4())), part(batch, str(uuid.uuid4()))
    in_flight = part(batch, live_run)  # a live publisher's, not switched in yet
    crashed = part(unpublished, str(uuid.uuid4()))
    kept_unsure = part(unreadable, str(uuid.uuid4()))
    odd = f"{dataset}/{batch}/notes.txt"  # not a part: never the janitor's
    # the scan resumes after an existing key (SeaweedFS skips a folder whose name is a
    # prefix of StartAfter): this one sorts before the dataset's other keys
    start = f"{dataset}/0-start"
    for key in (start, listed, stale, in_flight, crashed, kept_unsure, odd):
        store.write_bytes(LAKE, key, b"PAR1", "application/octet-stream")
    manifest = {"batch_id": f"{dataset}/{batch}", "datasets": {dataset: {"objects": [
        {"key": listed, "rows": 1, "bytes": 4, "sha256": "0" * 64}]}}}
    batches = {batch: json.dumps(manifest).encode(), unreadable: b"{not json"}
    for batch_id, body in batches.items():
        store.write_bytes(LAKE, completion_key(batch_id), body, "application/json")

    def scan(retention_hours: float, budget: int = 100) -> list[int]:
        """Tick from just before the dataset's keys until past them; the parts each tick
        removed."""
        cursor, removed = json.dumps({"version": 1, "lake_after": start}), []
        retention = RetentionResource(retention_hours=retention_hours, lake_keys_per_tick=4,
                                      max_deletions_per_tick=budget)
        while len(removed) < 20:
            result = _tick(instance, retention, cursor)
            removed.append(int(result.skip_reason.skip_message.split(" and ")[1].split()[0]))
            cursor = result.cursor
            if not json.loads(cursor)["lake_after"].startswith(f"{dataset}/"):
                return removed
        pytest.fail(f"the scan did not get past the dataset in 20 ticks: {removed}")

    try:
        assert sum(scan(retention_hours=1)) == 0
        assert max(scan(retention_hours=0, budget=1)) == 1  # one a tick, resuming after it
        assert not store.exists(LAKE, stale) and not store.exists(LAKE, crashed)
        for key in (listed, in_flight, kept_unsure, odd):
            assert store.exists(LAKE, key), key
    finally:
        for key in (start, listed, in_flight, kept_unsure, odd):
            store.delete(LAKE, key)
        for batch_id in batches:
            store.delete(LAKE, completion_key(batch_id))


def test_a_batch_too_large_for_the_scratch_disk_fails_before_any_download(
        instance, store, landing_store, tmp_path, batch_id):
    land_sample(landing_store, tmp_path, batch_id, n_points=100)
    request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    free = shutil.disk_usage(scratch).free
    resources = {**build_resources(), "scratch": ScratchResource(
        directory=str(scratch), reserve_megabytes=free // 2**20 + 1024)}
    result = ingest_batch.execute_in_process(
        run_config=request.run_config, instance=instance, tags=request.tags,
        resources=resources, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "shard_batch"
    message = failure.event_specific_data.error.to_string()
    assert f"ScratchSpaceError: batch {batch_id!r}: its landed files total " in message
    assert "bytes of local scratch (3 x the files, 8 x those in a compressed format" in message
    assert f"but {scratch / result.run_id} has " in message and "Nothing was downloaded" in message
    assert list(scratch.iterdir()) == [], "the run removes its scratch when it fails"
    assert store.exists("landing-zone", f"{batch_id}/points.fgb")
    assert not store.exists(LAKE, completion_key(batch_id))

    # the failed run can be re-executed from failure: its op outputs stay within the retention
    outputs = f"dagster-io/{result.run_id}/"
    _tick(instance, RetentionResource(retention_hours=1))
    assert list(store.list(STAGING, outputs)), "a re-executable run's op outputs"
    _tick_until_idle(instance, RetentionResource(retention_hours=0))
    assert list(store.list(STAGING, outputs)) == []
