"""Failures leave nothing behind: no PostGIS schema, no partial lake batch, landing untouched."""

import json
import time
import uuid

import pytest
from dagster import DagsterInstance, DagsterRunStatus, build_sensor_context
from dagster._core.test_utils import create_run_for_test
from psycopg import sql

from etl_pipelines.definitions import build_resources
from etl_pipelines.sensors.janitor import UNKNOWN_RUN_GRACE_SECONDS, postgis_schema_janitor
from libs import postgis
from libs.lake import completion_key
from tests.integration.pipeline import land_sample, request_for, run_ingest, sensor_tick

pytestmark = pytest.mark.integration


@pytest.fixture
def instance():
    with DagsterInstance.ephemeral() as inst:
        yield inst


def _schemas(pg) -> set[str]:
    return {r[0] for r in pg.execute("SELECT nspname FROM pg_namespace").fetchall()}


def test_failed_join_drops_the_schema_and_publishes_nothing(
        store, tmp_path, batch_id, instance, pg, ledger):
    def missing_column(manifest):
        manifest["join"]["aggregations"] = [
            {"function": "sum", "column": "no_such_column", "output": "total"}]
        return manifest

    land_sample(store, tmp_path, batch_id, n_points=500, edit=missing_column)
    request = request_for(sensor_tick(instance), batch_id)
    result = run_ingest(instance, request, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "load_and_join"
    message = failure.event_specific_data.error.to_string()
    assert "'no_such_column' does not exist in layer 'points'" in message
    assert postgis.run_schema_name(result.run_id) not in _schemas(pg)
    assert not store.exists("data-lake", completion_key(batch_id))
    assert list(store.list("data-lake", f"points_per_country/{batch_id}/")) == []
    assert store.exists("landing-zone", f"{batch_id}/points.fgb")


def test_invalid_landed_file_fails_in_shard_naming_the_file(
        store, tmp_path, batch_id, instance, pg):
    land_sample(store, tmp_path, batch_id, n_points=100)
    store.put_bytes("landing-zone", f"{batch_id}/points.fgb", b"garbage, not FlatGeobuf",
                    "application/octet-stream")
    request = request_for(sensor_tick(instance), batch_id)
    result = run_ingest(instance, request, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "shard_batch"
    assert "'points.fgb' (layer 'points') cannot be read as flatgeobuf" in \
        failure.event_specific_data.error.to_string()
    assert not store.exists("data-lake", completion_key(batch_id))


def _janitor_tick(instance):
    resources = build_resources()
    with build_sensor_context(instance=instance,
                              resources={"postgis_db": resources["postgis_db"]}) as context:
        return postgis_schema_janitor(context)


@pytest.mark.parametrize("status", [DagsterRunStatus.CANCELED, DagsterRunStatus.FAILURE,
                                    DagsterRunStatus.SUCCESS])
def test_janitor_drops_schemas_of_finished_runs(stack_env, instance, pg, status):
    run = create_run_for_test(instance, job_name="ingest_batch", status=status)
    schema = postgis.run_schema_name(run.run_id)
    postgis.create_schema(pg, schema)
    _janitor_tick(instance)
    assert schema not in _schemas(pg)


def test_janitor_keeps_running_and_young_unknown_schemas_drops_old_unknown(
        stack_env, instance, pg):
    running = create_run_for_test(instance, job_name="ingest_batch",
                                  status=DagsterRunStatus.STARTED)
    kept = postgis.run_schema_name(running.run_id)
    young = postgis.run_schema_name(str(uuid.uuid4()))
    old = postgis.run_schema_name(str(uuid.uuid4()))
    for schema in (kept, young, old):
        postgis.create_schema(pg, schema)
    created = time.time() - UNKNOWN_RUN_GRACE_SECONDS - 60
    pg.execute(sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
        sql.Identifier(old), sql.Literal(json.dumps({"created_at": created}))))
    try:
        _janitor_tick(instance)
        schemas = _schemas(pg)
        assert old not in schemas
        assert kept in schemas and young in schemas
    finally:
        postgis.drop_schema(pg, kept)
        postgis.drop_schema(pg, young)
