"""A landed file cannot make GDAL open other files or URLs (issue 25's "Done when"): an OGR
VRT disguised as the declared format, pointing at a local canary file and at an HTTP listener
this test runs, is landed through the real sensor and job. The listener sees no connection,
the canary's contents reach no output and its path no message, and the run fails naming the
landed file and its declared format."""

import json
import uuid

import pytest
from bson import json_util
from dagster import DagsterInstance

from libs.lake import run_prefix
from libs.landing import land_batch
from libs.ledger import DATABASE
from libs.sample_batch import write_sample_batch
from tests.integration.pipeline import request_for, run_ingest, sensor_tick

pytestmark = pytest.mark.integration

EXTENSIONS = {"geojson": "geojson", "gpkg": "gpkg", "flatgeobuf": "fgb"}


def _disguised_vrt(canary: str, port: int) -> str:
    """An OGR VRT whose layers read a local file, a /vsicurl/ URL and a plain http URL."""
    sources = {"points": canary, "remote": f"/vsicurl/http://127.0.0.1:{port}/x.geojson",
               "plain": f"http://127.0.0.1:{port}/y.geojson"}
    layers = "".join(f'<OGRVRTLayer name="{name}"><SrcDataSource>{source}</SrcDataSource>'
                     f"</OGRVRTLayer>" for name, source in sources.items())
    return f"<OGRVRTDataSource>{layers}</OGRVRTDataSource>\n"


@pytest.mark.parametrize("fmt", list(EXTENSIONS))
def test_a_vrt_disguised_as_the_declared_format_reaches_nothing(
        stack_env, store, landing_store, tmp_path, listener, fmt):
    port, accepted = listener
    token = f"canary-{uuid.uuid4().hex}"
    canary = tmp_path / f"{token}.geojson"
    canary.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"point_id": 1, "value": 1.0, "category": token},
        "geometry": {"type": "Point", "coordinates": [1.0, 2.0]}}]}))
    batch_id = f"hostile-vrt-{fmt}-{uuid.uuid4().hex[:8]}"
    folder = tmp_path / batch_id
    manifest = write_sample_batch(folder, batch_id, n_points=200)
    culprit = f"points.{EXTENSIONS[fmt]}"
    (folder / "points.fgb").unlink()
    (folder / culprit).write_text(_disguised_vrt(str(canary), port))
    entry = next(e for e in manifest["files"] if e["layer"] == "points")
    entry.update(path=culprit, format=fmt)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    land_batch(landing_store, folder, batch_id)

    with DagsterInstance.ephemeral() as instance:
        request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
        assert request is not None, "the manifest itself is valid"
        result = run_ingest(instance, request, raise_on_error=False)
        messages = [json.dumps(_event_text(e)) for e in instance.all_logs(result.run_id)]

    assert not result.success
    assert accepted == [], f"GDAL connected to the listener: {accepted}"
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key in ("validate_batch", "shard_batch")
    error = failure.event_specific_data.error.to_string()
    assert f"file {culprit!r}" in error and f"declared {fmt}" in error, error
    assert "an XML document (OGR VRT)" in error, error

    outputs = list(messages)
    for key in [o.key for o in store.list("etl-staging", run_prefix(result.run_id))]:
        outputs.append(store.get_bytes("etl-staging", key).decode("utf-8", "replace"))
    for dataset in ("points", "countries", "points_per_country"):
        for key in [o.key for o in store.list("data-lake", f"{dataset}/{batch_id}/")]:
            outputs.append(store.get_bytes("data-lake", key).decode("utf-8", "replace"))
    outputs.extend(_ledger_documents(stack_env, batch_id, result.run_id))
    assert len(outputs) > len(messages), "the run's ledger documents were found"
    for text in outputs:
        assert token not in text, "the canary's contents (or its name) reached an output"
        assert str(tmp_path) not in text, "a local path outside the batch reached an output"


def _event_text(event) -> list[str]:
    """Every message of a Dagster event log entry, errors included."""
    texts = [event.user_message or "", event.message or ""]
    dagster_event = event.dagster_event
    if dagster_event is not None and dagster_event.event_specific_data is not None:
        error = getattr(dagster_event.event_specific_data, "error", None)
        if error is not None:
            texts.append(error.to_string())
    return texts


def _ledger_documents(stack_env, batch_id: str, run_id: str) -> list[str]:
    """Every ledger document about the batch or the run, as JSON text."""
    from pymongo import MongoClient

    client = MongoClient(stack_env["MONGO_CONNECTION_STRING"])
    try:
        db = client[DATABASE]
        found = []
        for name in db.list_collection_names():
            for document in db[name].find():
                text = json_util.dumps(document)
                if batch_id in text or run_id in text:
                    found.append(text)
        return found
    finally:
        client.close()
