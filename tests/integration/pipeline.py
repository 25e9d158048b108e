"""Helpers shared by the integration tests: land a batch, ask the sensor, run the job."""

import json
from pathlib import Path

from dagster import DagsterInstance, RunRequest, build_sensor_context

from etl_pipelines.definitions import build_resources, defs
from etl_pipelines.sensors.manifests import manifest_sensor
from libs.landing import land_batch
from libs.object_store import ObjectStore
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


def sensor_tick(instance: DagsterInstance, cursor: str | None = None):
    resources = build_resources()
    with build_sensor_context(instance=instance, cursor=cursor, resources={
            "object_store": resources["object_store"], "ledger": resources["ledger"]}) as context:
        return manifest_sensor(context)


def request_for(result, batch_id: str) -> RunRequest | None:
    matches = [r for r in result.run_requests if r.run_key == batch_id]
    assert len(matches) <= 1
    return matches[0] if matches else None


def run_ingest(instance: DagsterInstance, request: RunRequest, raise_on_error: bool = True):
    job = defs.resolve_job_def("ingest_batch")
    return job.execute_in_process(run_config=request.run_config, instance=instance,
                                  tags=request.tags, raise_on_error=raise_on_error)
