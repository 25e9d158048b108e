"""Each kind of bad landed data stops the run in shard_batch with an error naming the file,
layer and problem; nothing is published and the landing objects stay as they were."""

import json
import uuid
import zipfile

import geopandas as gpd
import pytest
import shapely
from dagster import DagsterInstance

from libs.lake import completion_key
from libs.landing import land_batch
from libs.sample_batch import NATURAL_EARTH_DIR, write_sample_batch
from tests.integration.pipeline import request_for, run_ingest, sensor_tick

pytestmark = pytest.mark.integration


def _set_file(manifest, layer, **changes):
    for entry in manifest["files"]:
        if entry["layer"] == layer:
            entry.update(changes)
            for key in [k for k, v in changes.items() if v is None]:
                entry.pop(key)


def mislabelled(folder, manifest):
    _set_file(manifest, "points", format="geojson")
    return "points.fgb", "declared geojson"


def shapefile_without_prj(folder, manifest):
    with zipfile.ZipFile(folder / "countries.zip", "w") as archive:
        for part in sorted(NATURAL_EARTH_DIR.glob("naturalearth_lowres.*")):
            if part.suffix != ".prj":
                archive.write(part, arcname=f"countries{part.suffix}")
    _set_file(manifest, "countries", source_crs=None)
    return "countries.zip", "source_crs"


def nan_coordinates(folder, manifest):
    frame = gpd.GeoDataFrame({"point_id": [1, 2], "value": [1.0, 2.0], "category": ["a", "b"]},
                             geometry=[shapely.Point(0, 0), shapely.Point(float("nan"), 1)],
                             crs="EPSG:3857")
    frame.to_parquet(folder / "points.parquet")
    _set_file(manifest, "points", path="points.parquet", format="geoparquet")
    return "points.parquet", "NaN"


def mixed_geometry_types(folder, manifest):
    frame = gpd.GeoDataFrame({"point_id": [1, 2], "value": [1.0, 2.0], "category": ["a", "b"]},
                             geometry=[shapely.Point(0, 0), shapely.box(0, 0, 1, 1)],
                             crs="EPSG:3857")
    frame.to_file(folder / "points.geojson", driver="GeoJSON")
    # mixed families are accepted by default (issue 27); 'one' asks for a single family
    _set_file(manifest, "points", path="points.geojson", format="geojson",
              geometry_families="one")
    return "points.geojson", "Polygon"


def zip_slip(folder, manifest):
    with zipfile.ZipFile(folder / "countries.zip", "w") as archive:
        for part in sorted(NATURAL_EARTH_DIR.glob("naturalearth_lowres.*")):
            archive.write(part, arcname=f"../countries{part.suffix}")
    return "countries.zip", ".."


def columns_disagree(folder, manifest):
    frame = gpd.GeoDataFrame({"other": ["x"]}, geometry=[shapely.Point(1, 1)], crs="EPSG:3857")
    frame.to_file(folder / "more_points.fgb", driver="FlatGeobuf")
    manifest["files"].append({"path": "more_points.fgb", "layer": "points",
                              "format": "flatgeobuf", "source_crs": "EPSG:3857"})
    return "more_points.fgb", "other"


@pytest.mark.parametrize("spoil", [mislabelled, shapefile_without_prj, nan_coordinates,
                                   mixed_geometry_types, zip_slip, columns_disagree],
                         ids=lambda f: f.__name__)
def test_bad_input_stops_the_run_in_shard(stack_env, store, landing_store, tmp_path, spoil):
    batch_id = f"bad-{spoil.__name__.replace('_', '-')}-{uuid.uuid4().hex[:8]}"
    folder = tmp_path / batch_id
    manifest = write_sample_batch(folder, batch_id, n_points=200)
    culprit, problem = spoil(folder, manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    keys = land_batch(landing_store, folder, batch_id)
    landed = {key: store.get_bytes("landing-zone", key) for key in keys}

    with DagsterInstance.ephemeral() as instance:
        request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
        assert request is not None, "the manifest itself is valid"
        result = run_ingest(instance, request, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "shard_batch"
    message = failure.event_specific_data.error.to_string()
    assert "InputDataError" in message
    assert culprit in message and problem in message, message
    assert not store.exists("data-lake", completion_key(batch_id))
    for dataset in ("points", "countries", "points_per_country"):
        assert list(store.list("data-lake", f"{dataset}/{batch_id}/")) == []
    for key, data in landed.items():
        assert store.get_bytes("landing-zone", key) == data, f"{key} changed"
