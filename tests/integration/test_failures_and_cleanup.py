"""Failures leave nothing behind: no PostGIS schema, no partial lake batch, landing untouched."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from dagster import DagsterInstance, build_sensor_context

from devstack.layout import REPO
from etl_pipelines.definitions import build_resources
from etl_pipelines.sensors.janitor import postgis_schema_janitor
from libs import postgis
from libs.lake import completion_key
from libs.postgis import connect
from tests.integration.pipeline import land_sample, request_for, run_ingest, sensor_tick

pytestmark = pytest.mark.integration


@pytest.fixture
def instance():
    with DagsterInstance.ephemeral() as inst:
        yield inst


def _schemas(pg) -> set[str]:
    return {r[0] for r in pg.execute("SELECT nspname FROM pg_namespace").fetchall()}


def _fails_in_load_and_join(landing_store, tmp_path, batch_id, instance, edit):
    """Land the sample with ``edit`` applied to its manifest and run it: the run fails in
    load_and_join; returns the result and the step's error text."""
    land_sample(landing_store, tmp_path, batch_id, n_points=500, edit=edit)
    request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
    result = run_ingest(instance, request, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "load_and_join"
    return result, failure.event_specific_data.error.to_string()


def test_failed_join_drops_the_schema_and_publishes_nothing(
        store, landing_store, tmp_path, batch_id, instance, pg, ledger):
    # a column the layer lacks is refused at shard now (libs.postgis.join_load_problem); a
    # sum over text is only found once the layers are loaded
    def sum_of_text(manifest):
        manifest["join"]["aggregations"] = [
            {"function": "sum", "column": "category", "output": "total"}]
        return manifest

    result, message = _fails_in_load_and_join(landing_store, tmp_path, batch_id, instance,
                                              sum_of_text)
    assert "sum needs a numeric column but 'category' of layer 'points' is string" in message
    assert postgis.run_schema_name(result.run_id) not in _schemas(pg)
    assert not store.exists("data-lake", completion_key(batch_id))
    assert list(store.list("data-lake", f"points_per_country/{batch_id}/")) == []
    assert store.exists("landing-zone", f"{batch_id}/points.fgb")


def test_a_failed_load_of_the_layer_loaded_beside_drops_the_schema(
        store, landing_store, tmp_path, batch_id, instance, pg):
    """The join's points get BRIN and load on their own connection beside the other layers;
    when that load fails (here: a recipe names a points column ``geom``, which the loader
    reserves), the step fails with the loader's message once the other layers are in, and
    the schema goes."""
    def points_column_named_geom(manifest):
        manifest["recipes"] = {"points": [
            {"step": "reproject"}, {"step": "rename", "columns": {"category": "geom"}}]}
        # the right layer is loaded with the columns its join reads only: carry that one
        manifest["join"] = {k: v for k, v in manifest["join"].items() if k != "aggregations"}
        manifest["join"]["carry"] = ["geom"]
        return manifest

    result, message = _fails_in_load_and_join(landing_store, tmp_path, batch_id, instance,
                                              points_column_named_geom)
    assert "layer 'points': column 'geom' is reserved by the loader; rename it" in message
    logs = [e.message for e in instance.all_logs(result.run_id) if e.message]
    assert any("loaded layer countries" in m for m in logs)  # loaded beside, not after
    assert not any("loaded layer points" in m for m in logs)
    assert postgis.run_schema_name(result.run_id) not in _schemas(pg)
    assert not store.exists("data-lake", completion_key(batch_id))


def test_invalid_landed_file_fails_in_shard_naming_the_file(
        store, landing_store, tmp_path, batch_id, instance, pg):
    land_sample(landing_store, tmp_path, batch_id, n_points=100)
    # the data team lands a bad file over the good one (overwriting is landing's right)
    landing_store.put_bytes("landing-zone", f"{batch_id}/points.fgb", b"garbage, not FlatGeobuf",
                            "application/octet-stream")
    request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
    result = run_ingest(instance, request, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "shard_batch"
    # refused by the declared-format check before GDAL opens it (libs/sharding/sniffing.py)
    assert "file 'points.fgb' (layer 'points'): declared flatgeobuf but its bytes are" in \
        failure.event_specific_data.error.to_string()
    assert not store.exists("data-lake", completion_key(batch_id))


def _janitor_tick(instance):
    resources = build_resources()
    with build_sensor_context(instance=instance,
                              resources={"postgis_db": resources["postgis_db"]}) as context:
        return postgis_schema_janitor(context)


def test_janitor_keeps_schemas_whose_run_is_alive_and_drops_orphans(
        stack_env, instance, postgis_settings, pg):
    alive = postgis.run_schema_name(str(uuid.uuid4()))
    orphan = postgis.run_schema_name(str(uuid.uuid4()))
    with connect(postgis_settings) as owner:
        postgis.create_schema(owner, alive)
        with connect(postgis_settings) as short_lived:
            postgis.create_schema(short_lived, orphan)
        # the orphan's creator is gone (its session ended without dropping the schema)
        _janitor_tick(instance)
        schemas = _schemas(pg)
        assert orphan not in schemas
        assert alive in schemas, "a schema whose creator is alive must never be dropped"
        postgis.drop_schema(owner, alive)


KILLABLE_RUN = """
import json, sys
from dagster import DagsterInstance
from etl_pipelines.definitions import defs
config, run_id, tags = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
with DagsterInstance.ephemeral() as instance:
    defs.resolve_job_def("ingest_batch").execute_in_process(run_config=config, instance=instance,
                                                            run_id=run_id, tags=tags)
"""


def test_janitor_removes_the_schema_of_a_run_killed_mid_load(
        stack_env, store, landing_store, tmp_path, batch_id, instance, pg):
    land_sample(landing_store, tmp_path, batch_id, n_points=300_000)
    request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run_id = str(uuid.uuid4())
    schema = postgis.run_schema_name(run_id)
    run = subprocess.Popen(
        # the sensor's tags: its claim token is what lets this run start on the batch
        [sys.executable, "-c", KILLABLE_RUN, json.dumps(request.run_config), run_id,
         json.dumps(dict(request.tags))],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        loading = False
        while not loading and time.monotonic() < deadline and run.poll() is None:
            # the points table exists only while load_and_join is loading or joining
            loading = pg.execute("SELECT to_regclass(%s) IS NOT NULL",
                                 (f"{schema}.points",)).fetchone()[0]
            time.sleep(0.05)
        assert loading, "the run never reached load_and_join"
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert schema in _schemas(pg), "killed mid-load, the run could not drop its schema"
    deadline = time.monotonic() + 30
    while schema in _schemas(pg) and time.monotonic() < deadline:
        _janitor_tick(instance)  # the dead session's lock is released as soon as PG notices
        time.sleep(0.5)
    assert schema not in _schemas(pg)
    assert not store.exists("data-lake", completion_key(batch_id))
