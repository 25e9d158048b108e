"""Helpers shared by the integration tests: land a batch, ask the sensor, run the job."""

import json
import os
from pathlib import Path

from dagster import DagsterInstance, RunRequest, SkipReason, build_sensor_context

from etl_pipelines.definitions import build_resources, defs
from etl_pipelines.sensors.discovery import read_cursor, write_cursor
from etl_pipelines.sensors.manifests import manifest_sensor
from libs.landing import land_batch
from libs.manifest import MANIFEST_FILENAME
from libs.object_store import ObjectStore, ObjectStoreSettings
from libs.sample_batch import write_sample_batch


def land_sample(store: ObjectStore, tmp_path: Path, batch_id: str, n_points: int = 20_000,
                edit=None) -> dict:
    folder = tmp_path / batch_id
    manifest = write_sample_batch(folder, batch_id, n_points=n_points)
    if edit is not None:
        manifest = edit(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    land_batch(store, folder, batch_id)
    return manifest


def cursor_focused_on(store: ObjectStore, prefixes: list[str]) -> str:
    """A sensor cursor that has processed every manifest in the landing zone except those
    under ``prefixes``: a tick from it looks only at this test's batches, however many
    manifests earlier tests and sessions left behind."""
    processed = {o.key: o.etag for o in store.list("landing-zone")
                 if o.key.endswith("/" + MANIFEST_FILENAME)
                 and not o.key.startswith(tuple(f"{p}/" for p in prefixes))}
    return write_cursor(processed)


def sensor_tick(instance: DagsterInstance, cursor: str | None = None, *,
                focus: str | list[str] | None = None, limits=None, ledger=None):
    """One tick. A given cursor loses its listing position, so the tick lists the whole
    landing zone: these tests are about claims and records, and must not depend on how many
    objects earlier tests left (test_manifest_discovery tests the resuming listing)."""
    resources = build_resources()
    if cursor is not None:
        cursor = write_cursor(read_cursor(cursor))
    if cursor is None and focus is not None:
        store = ObjectStore(ObjectStoreSettings(os.environ["MINIO_ENDPOINT"],
                                                os.environ["MINIO_ROOT_USER"],
                                                os.environ["MINIO_ROOT_PASSWORD"]))
        cursor = cursor_focused_on(store, [focus] if isinstance(focus, str) else focus)
    with build_sensor_context(instance=instance, cursor=cursor, resources={
            "object_store": resources["object_store"], "ledger": ledger or resources["ledger"],
            "input_limits": limits or resources["input_limits"]}) as context:
        return manifest_sensor(context)


def request_for(result, batch_id: str) -> RunRequest | None:
    matches = [r for r in result.run_requests if r.run_key == batch_id]
    assert len(matches) <= 1
    return matches[0] if matches else None


def requested_nothing(result) -> bool:
    """The tick skipped (a skip may still carry a moved listing position)."""
    return isinstance(result, SkipReason) or (
        not result.run_requests and result.skip_reason is not None)


def run_ingest(instance: DagsterInstance, request: RunRequest, raise_on_error: bool = True):
    job = defs.resolve_job_def("ingest_batch")
    return job.execute_in_process(run_config=request.run_config, instance=instance,
                                  tags=request.tags, raise_on_error=raise_on_error)
