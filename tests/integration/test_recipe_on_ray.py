"""A recipe run chunk by chunk on Ray equals the same recipe run serially with plain geopandas
on the whole dataset; rejected rows are published beside the data and counts reconcile."""

import io
import json
import uuid

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
import shapely
from dagster import DagsterInstance, RunRequest
from geopandas.testing import assert_geodataframe_equal

from libs.lake import completion_key
from tests.integration.pipeline import land_sample, request_for, run_ingest, sensor_tick

pytestmark = pytest.mark.integration

N_POINTS = 12_000
TARGET = "EPSG:8857"
RECIPES = {
    "points": [
        {"step": "reproject"},
        {"step": "filter", "column": "value", "op": ">=", "value": 60.0},
        {"step": "derive", "column": "x", "kind": "centroid_x"},
        {"step": "rename", "columns": {"category": "kind"}},
    ],
    "countries": [
        {"step": "reproject"},
        {"step": "make_valid", "policy": "repair"},
        {"step": "promote_to_multi"},
        {"step": "simplify", "tolerance": 1000.0},
        {"step": "derive", "column": "area_km2_raw", "kind": "area"},
        {"step": "normalize_column_names"},
    ],
}


@pytest.fixture(scope="module")
def ran(stack_env, store, landing_store, tmp_path_factory):
    batch_id = f"recipe-{uuid.uuid4().hex[:12]}"
    tmp = tmp_path_factory.mktemp("recipe")

    def with_recipes(manifest):
        manifest["recipes"] = RECIPES
        manifest["join"]["aggregations"] = [{"function": "count", "output": "n"},
                                            {"function": "sum", "column": "x", "output": "sx"}]
        return manifest

    land_sample(landing_store, tmp, batch_id, n_points=N_POINTS, edit=with_recipes)
    with DagsterInstance.ephemeral() as instance:
        request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
        config = dict(request.run_config)
        config["ops"] = {**config["ops"], "shard_batch": {"config": {"chunk_rows": 2_500}}}
        result = run_ingest(instance, RunRequest(run_key=request.run_key, run_config=config,
                                                      tags=request.tags))
    completion = json.loads(store.get_bytes("data-lake", completion_key(batch_id)))
    return {"folder": tmp / batch_id, "completion": completion, "result": result}


def _dataset(store, completion, name) -> gpd.GeoDataFrame:
    frames = [gpd.read_parquet(io.BytesIO(store.get_bytes("data-lake", o["key"])))
              for o in completion["datasets"][name]["objects"]]
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=frames[0].crs)


def test_points_equal_serial_geopandas(ran, store):
    ours = _dataset(store, ran["completion"], "points")
    whole = pyogrio.read_dataframe(ran["folder"] / "points.fgb").to_crs(TARGET)
    expected = whole[whole["value"] >= 60.0].copy()
    expected["x"] = expected.geometry.centroid.x
    expected = expected.rename(columns={"category": "kind"})
    ours = ours.sort_values("point_id").reset_index(drop=True)
    expected = expected.sort_values("point_id").reset_index(drop=True)
    columns = ["point_id", "value", "kind", "x", "geometry"]
    assert_geodataframe_equal(ours[columns], expected[columns], check_less_precise=True,
                              check_dtype=False)


def test_filtered_points_are_rejected_with_a_reason_and_counts_reconcile(ran, store):
    rejects = _dataset(store, ran["completion"], "points_rejects")
    whole = pyogrio.read_dataframe(ran["folder"] / "points.fgb")
    attributes = rejects["_attributes"].map(json.loads)
    rejected_ids = sorted(a["point_id"] for a in attributes)
    assert rejected_ids == sorted(whole.loc[whole["value"] < 60.0, "point_id"])
    assert rejects["_reject_step"].eq("filter").all()
    assert rejects["_reject_reason"].str.contains("value").all()
    datasets = ran["completion"]["datasets"]
    assert datasets["points"]["rows"] + datasets["points_rejects"]["rows"] == N_POINTS


def test_countries_equal_serial_geopandas(ran, store):
    ours = _dataset(store, ran["completion"], "countries")
    whole = pyogrio.read_dataframe(f"/vsizip/{ran['folder'] / 'countries.zip'}").to_crs(TARGET)
    # make_valid(policy=repair) repairs invalid rows only, GEOS "structure" method
    invalid = ~whole.geometry.is_valid
    whole.loc[invalid, "geometry"] = whole.loc[invalid].geometry.make_valid(
        method="structure", keep_collapsed=False)

    def multi(series):
        return gpd.GeoSeries(series.apply(
            lambda g: shapely.MultiPolygon([g]) if g.geom_type == "Polygon" else g), crs=TARGET)

    # GEOS simplify turns a one-part MultiPolygon back into a Polygon: promote again
    whole["geometry"] = multi(multi(whole.geometry).simplify(1000.0, preserve_topology=True))
    whole["area_km2_raw"] = whole.geometry.area
    ours = ours.sort_values("name").reset_index(drop=True)
    whole = whole.sort_values("name").reset_index(drop=True)
    assert list(ours["name"]) == list(whole["name"])
    assert set(ours.geometry.geom_type) == {"MultiPolygon"}
    np.testing.assert_allclose(ours["area_km2_raw"], whole["area_km2_raw"], rtol=1e-9)
    assert ours.geometry.normalize().geom_equals_exact(whole.geometry.normalize(),
                                                       tolerance=1e-6).all()


def test_join_sees_the_transformed_layers(ran, store):
    joined = _dataset(store, ran["completion"], "points_per_country")
    points = _dataset(store, ran["completion"], "points")
    assert len(joined) == 177
    assert int(joined["n"].sum()) <= len(points)
    assert joined.loc[joined["n"] == 0, "sx"].isna().all()
