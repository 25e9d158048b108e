"""Row-level errors on the real stack (issue 27): a CSV with bad rows among good ones
publishes the good rows and puts the bad ones in ``<layer>_rejects`` with their 1-based data
line and reason; more bad rows than the layer's max_reject_fraction fail the run listing them
by reason, with nothing published and the cause in the ledger's run record; a broken file
fails with how to retry, and re-executing all steps after landing the fix publishes."""

import io
import json

import geopandas as gpd
import pyarrow.parquet as pq
import pytest
import shapely
from dagster import (
    DagsterInstance,
    ReexecutionOptions,
    build_run_status_sensor_context,
    execute_job,
    instance_for_test,
    reconstructable,
)

from etl_pipelines.definitions import build_resources
from etl_pipelines.sensors.janitor import ledger_run_failure_sensor
from libs.lake import completion_key
from libs.landing import land_batch
from libs.sample_batch import write_sample_batch
from tests.integration.pipeline import request_for, run_ingest, sensor_tick
from tests.integration.reexecutable import ingest_batch_job

pytestmark = pytest.mark.integration

N_POINTS = 200
#: data lines (1-based, the header not counted) -> what is wrong with them
BAD_LINES = {4: "POINT (1", 9: "POINT (nan 2)", 13: "bad text"}
N_SITES = 20


def _sites_csv() -> bytes:
    lines = [b"id,wkt,name"]
    for line in range(1, N_SITES + 1):
        wkt, name = f"POINT ({line} {line / 2})", f"site {line}".encode()
        if BAD_LINES.get(line, "").startswith("POINT"):
            wkt = BAD_LINES[line]
        if BAD_LINES.get(line) == "bad text":
            name = "Zürich".encode("cp1252")  # not UTF-8, which the file declares by default
        lines.append(f"{line},{wkt},".encode() + name)
    return b"\n".join(lines) + b"\n"


def _land(landing_store, tmp_path, batch_id: str, **manifest_fields) -> dict:
    folder = tmp_path / batch_id
    manifest = write_sample_batch(folder, batch_id, n_points=N_POINTS)
    (folder / "sites.csv").write_bytes(_sites_csv())
    manifest["files"].append({"path": "sites.csv", "layer": "sites", "format": "csv",
                              "source_crs": "EPSG:4326", "csv": {"wkt_column": "wkt"}})
    manifest.update(manifest_fields)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    land_batch(landing_store, folder, batch_id)
    return manifest


def _failure(result) -> tuple[str, str]:
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    error = failure.event_specific_data.error
    while error.cause is not None and error.cls_name == "DagsterExecutionStepExecutionError":
        error = error.cause
    return failure.step_key, error.message


def _nothing_published(store, batch_id: str) -> None:
    assert not store.exists("data-lake", completion_key(batch_id))
    for dataset in ("points", "countries", "sites", "sites_rejects", "points_per_country"):
        assert list(store.list("data-lake", f"{dataset}/{batch_id}/")) == []


def test_bad_csv_rows_are_rejects_with_their_data_line_and_the_good_rows_are_published(
        stack_env, store, landing_store, tmp_path, batch_id):
    _land(landing_store, tmp_path, batch_id, max_reject_fraction={"sites": 0.2})
    with DagsterInstance.ephemeral() as instance:
        result = run_ingest(instance, request_for(sensor_tick(instance, focus=batch_id),
                                                  batch_id))
    assert result.success
    [metadata] = [e.event_specific_data.metadata for e in result.all_events
                  if e.event_type_value == "STEP_OUTPUT" and e.step_key == "shard_batch"]
    assert metadata["rows_unreadable"].value == len(BAD_LINES)
    assert metadata["rows_over_vertex_limit"].value == 0
    completion = json.loads(store.get_bytes("data-lake", completion_key(batch_id)))
    datasets = completion["datasets"]
    assert datasets["sites"]["rows"] == N_SITES - len(BAD_LINES)
    rejects = pq.read_table(io.BytesIO(store.get_bytes(
        "data-lake", datasets["sites_rejects"]["objects"][0]["key"]))).sort_by("_row_id")
    assert rejects.num_rows == len(BAD_LINES)
    assert rejects.column("_reject_step").to_pylist() == ["read"] * len(BAD_LINES)
    reasons = rejects.column("_reject_reason").to_pylist()
    for reason, line in zip(reasons, sorted(BAD_LINES), strict=True):
        assert reason.startswith(f"file 'sites.csv' (layer 'sites'), data line {line}"), reason
    assert "holds 'POINT (1', which is not valid WKT" in reasons[0]
    assert "coordinates are NaN or infinite" in reasons[1]
    assert "column 'name': text b'Z\\xfcrich' is not valid in encoding UTF-8" in reasons[2]
    ids = [json.loads(a)["id"] for a in rejects.column("_attributes").to_pylist()]
    assert ids == sorted(BAD_LINES)  # the id column is typed: CSV types are inferred


def test_a_reject_fraction_breach_fails_listing_problems_by_reason_and_publishes_nothing(
        stack_env, store, landing_store, ledger, tmp_path, batch_id):
    _land(landing_store, tmp_path, batch_id)  # the default fraction, 0.1: 3 of 20 is over
    with DagsterInstance.ephemeral() as instance:
        result = run_ingest(instance, request_for(sensor_tick(instance, focus=batch_id),
                                                  batch_id), raise_on_error=False)
        assert not result.success
        step, message = _failure(result)
        assert step == "shard_batch"
        assert ("layer 'sites': 3 of 20 rows were rejected as bad data (15.0%), more than its "
                "max_reject_fraction 0.1 allows. The first problems, by reason:\n  read: column "
                "… holds …, which is not valid WKT; expected e.g. … (or an empty value for no "
                "geometry) (1 listed)\n    - file 'sites.csv' (layer 'sites'), data line 4: "
                "column 'wkt'") in message, message
        assert "data line 9: coordinates are NaN or infinite" in message
        assert "data line 13, column 'name'" in message
        assert f"/runs/{result.run_id}) and choose Re-execute > All steps" in message
        assert "Nothing of the batch was published" in message
        _nothing_published(store, batch_id)
        # the ledger's run record: the failing step and the step's own error, in full
        with build_run_status_sensor_context(
                sensor_name="ledger_run_failure_sensor", dagster_instance=instance,
                dagster_run=result.dagster_run, dagster_event=result.get_run_failure_event(),
                resources={"ledger": build_resources()["ledger"]}) as context:
            ledger_run_failure_sensor(context.for_run_failure())
    record = ledger.run(result.run_id)
    assert record["status"] == "FAILURE" and record["failed_step"] == "shard_batch"
    assert record["cause"].startswith("InputDataError: layer 'sites': 3 of 20 rows")
    assert "data line 13" in record["cause"] and "Re-execute > All steps" in record["cause"]


def test_recipe_rejects_count_too_the_transform_fails_a_breach_and_publishes_nothing(
        stack_env, store, landing_store, tmp_path, batch_id):
    folder = tmp_path / batch_id
    manifest = write_sample_batch(folder, batch_id, n_points=N_POINTS)
    bowtie = shapely.Polygon([(0, 0), (1, 1), (1, 0), (0, 1), (0, 0)])  # self-intersecting
    zones = [shapely.box(i, 0, i + 1, 1) for i in range(8)] + [bowtie, bowtie]
    gpd.GeoDataFrame({"zone": range(10)}, geometry=zones, crs="EPSG:4326").to_file(
        folder / "zones.geojson", driver="GeoJSON")
    manifest["files"].append({"path": "zones.geojson", "layer": "zones", "format": "geojson"})
    manifest["recipes"] = {"zones": [{"step": "make_valid", "policy": "reject"}],
                           # selections are not problems: 90 % of the points filtered away
                           "points": [{"step": "filter", "column": "value", "op": ">=",
                                       "value": 90.0}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    land_batch(landing_store, folder, batch_id)
    with DagsterInstance.ephemeral() as instance:
        result = run_ingest(instance, request_for(sensor_tick(instance, focus=batch_id),
                                                  batch_id), raise_on_error=False)
    assert not result.success
    step, message = _failure(result)
    assert step == "transform_chunks"
    assert message.startswith("libs.errors.InputDataError: layer 'zones': 2 of 10 rows were "
                              "rejected as bad data (20.0%)"), message
    assert "\n  make_valid: " in message and "(2 listed)" in message, message
    assert "layer 'points'" not in message
    _nothing_published(store, batch_id)


def test_a_broken_file_says_how_to_retry_and_reexecuting_all_steps_reads_the_fix(
        stack_env, store, landing_store, ledger, tmp_path, batch_id):
    manifest = _land(landing_store, tmp_path, batch_id, max_reject_fraction={"sites": 0.2})
    good = (tmp_path / batch_id / "points.fgb").read_bytes()
    landing_store.put_bytes("landing-zone", f"{batch_id}/points.fgb", b"not a flatgeobuf",
                            "application/octet-stream")
    with instance_for_test() as instance:
        request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
        failed = execute_job(reconstructable(ingest_batch_job), instance,
                             run_config=request.run_config, tags=request.tags,
                             raise_on_error=False)
        assert not failed.success
        step, message = _failure(failed)
        assert step == "shard_batch"
        assert "file 'points.fgb' (layer 'points'): declared flatgeobuf" in message, message
        assert "/tmp/" not in message and "etl-scratch" not in message, message
        assert (f"land the corrected file(s) at the same key(s) in the batch's folder, then open "
                f"the run in the Dagster UI (http://127.0.0.1:3000/runs/{failed.run_id}) and "
                "choose Re-execute > All steps") in message, message
        batch = ledger.batch(batch_id)
        # a run failed on its input releases the pins of the data files, not the manifest's
        assert "objects" not in batch["pinned"] and batch["pinned"]["manifest"]
        assert batch["pins_released"][0]["run_id"] == failed.run_id
        _nothing_published(store, batch_id)

        landing_store.put_bytes("landing-zone", f"{batch_id}/points.fgb", good,
                                "application/octet-stream")
        # "from failure" reuses the failed run's plan, which pinned the broken version
        resumed = execute_job(reconstructable(ingest_batch_job), instance,
                              reexecution_options=ReexecutionOptions.from_failure(
                                  failed.run_id, instance), raise_on_error=False)
        assert not resumed.success
        step, message = _failure(resumed)
        assert step == "shard_batch" and "re-execute all steps instead" in message, message
        again = execute_job(reconstructable(ingest_batch_job), instance,
                            reexecution_options=ReexecutionOptions(parent_run_id=failed.run_id))
        assert again.success
    completion = json.loads(store.get_bytes("data-lake", completion_key(batch_id)))
    assert completion["datasets"]["points"]["rows"] == N_POINTS
    assert manifest["batch_id"] == batch_id
    pinned = {o["key"]: o for o in ledger.batch(batch_id)["pinned"]["objects"]}
    assert pinned[f"{batch_id}/points.fgb"]["size"] == len(good)  # the fix, pinned anew
