"""Batches of the shapes users land (issue 27): one layer and no join (ingested, PostGIS never
used), two joins (each its own dataset), a 2,000-column layer (all of it in the lake, only the
columns the joins read in PostGIS; read whole as a left layer it is refused before the
transform), and a CSV whose attribute types are inferred and overridden.

Three runs share one Dagster instance; the fixtures are written here, under tmp_path."""

import io
import json
import uuid

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pyogrio
import pytest
from dagster import DagsterInstance

from libs.lake import completion_key
from libs.landing import land_batch
from libs.sample_batch import natural_earth_countries_zip, synthetic_points
from tests.integration.pipeline import request_for, run_ingest, sensor_tick
from tests.integration.ray_test_cluster import lake_dataset, output_metadata

pytestmark = pytest.mark.integration

TARGET = "EPSG:8857"
WIDE_COLUMNS = 2_000
N_WIDE = 300
SITES_CSV = (
    "wkt,site_id,code,score,open,since,label\n"
    "POINT (2.35 48.85),1,0042,7,true,2020-05-01,Paris\n"
    "POINT (13.4 52.52),2,0043,8,false,2021-06-02,Berlin\n"
    "POINT (-3.7 40.42),3,1044,,TRUE,,Madrid\n"
)


def _wide_points() -> gpd.GeoDataFrame:
    """N_WIDE points with a point id and WIDE_COLUMNS float columns c0000.. (value: id + i)."""
    points = synthetic_points(N_WIDE, seed=7).to_crs("EPSG:4326")[["point_id", "geometry"]]
    ids = points["point_id"].to_numpy(dtype="float64")
    columns = {f"c{i:04d}": ids + i for i in range(WIDE_COLUMNS)}
    return gpd.GeoDataFrame(pd.concat([points[["point_id"]], pd.DataFrame(columns)], axis=1),
                            geometry=points.geometry, crs="EPSG:4326")


def _land(store, folder, batch_id: str, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps({"manifest_version": 1,
                                                      "batch_id": batch_id,
                                                      "target_crs": TARGET, **manifest}))
    land_batch(store, folder, batch_id)


@pytest.fixture(scope="module")
def runs(stack_env, store, landing_store, tmp_path_factory):
    tag = uuid.uuid4().hex[:10]
    ids = {"single": f"single-{tag}", "several": f"several-{tag}", "too-wide": f"too-wide-{tag}"}

    single = tmp_path_factory.mktemp("single")
    pyogrio.write_dataframe(synthetic_points(1_500, seed=3), single / "points.fgb",
                            driver="FlatGeobuf")
    _land(landing_store, single, ids["single"], {"files": [
        {"path": "points.fgb", "layer": "points", "format": "flatgeobuf"}]})

    several = tmp_path_factory.mktemp("several")
    wide = _wide_points()
    wide.to_parquet(several / "wide.parquet")
    natural_earth_countries_zip(several / "countries.zip")
    (several / "sites.csv").write_text(SITES_CSV)
    files = [
        {"path": "wide.parquet", "layer": "wide", "format": "geoparquet"},
        {"path": "countries.zip", "layer": "countries", "format": "shapefile_zip",
         "source_crs": "EPSG:4326"},
        {"path": "sites.csv", "layer": "sites", "format": "csv", "source_crs": "EPSG:4326",
         "csv": {"wkt_column": "wkt", "column_types": {"site_id": "string",
                                                       "score": "float64"}}},
    ]
    _land(landing_store, several, ids["several"], {"files": files, "joins": [
        {"name": "per_country", "left": "countries", "right": "wide",
         "aggregations": [{"function": "count", "output": "n"},
                          {"function": "sum", "column": "c0007", "output": "c7_sum"}]},
        {"name": "wide_country", "left": "wide", "right": "countries", "left_columns": ["c0001"],
         "predicate": "nearest", "k": 1, "carry": ["name"]},
    ]})

    too_wide = tmp_path_factory.mktemp("too-wide")
    wide.to_parquet(too_wide / "wide.parquet")
    natural_earth_countries_zip(too_wide / "countries.zip")
    _land(landing_store, too_wide, ids["too-wide"], {"files": files[:2], "joins": [
        {"name": "wide_country", "left": "wide", "right": "countries", "predicate": "nearest",
         "k": 1, "carry": ["name"]}]})

    results, logs = {}, {}
    with DagsterInstance.ephemeral() as instance:
        tick = sensor_tick(instance, focus=list(ids.values()))
        for name, batch_id in ids.items():
            results[name] = run_ingest(instance, request_for(tick, batch_id),
                                       raise_on_error=False)
            logs[name] = [e.message for e in instance.all_logs(results[name].run_id)
                          if e.message]
    return {"ids": ids, "results": results, "logs": logs, "wide": wide,
            "countries": pyogrio.read_dataframe(f"/vsizip/{several / 'countries.zip'}")}


def _failure(result) -> str:
    """The failed step and its user-facing message (for an assertion's message)."""
    failure = next((e for e in result.all_events if e.event_type_value == "STEP_FAILURE"), None)
    if failure is None:
        return "no step failed"
    error = failure.event_specific_data.error
    return f"{failure.step_key}: {(error.cause or error).message}"


def _completion(store, batch_id: str) -> dict:
    return json.loads(store.get_bytes("data-lake", completion_key(batch_id)))


def test_a_single_layer_batch_without_a_join_is_ingested_without_postgis(runs, store):
    result, batch_id = runs["results"]["single"], runs["ids"]["single"]
    assert result.success, _failure(result)
    datasets = _completion(store, batch_id)["datasets"]
    assert {name: entry["rows"] for name, entry in datasets.items()} == {"points": 1_500}
    assert output_metadata(result, "load_and_join") == {"joins": 0, "rows": 0, "loaded_rows": 0}
    points = lake_dataset(store, batch_id, "points", "point_id")
    assert points["point_id"].tolist() == list(range(1_500)) and points.crs.equals(TARGET)


def test_two_joins_are_each_published_as_a_dataset(runs, store, ledger):
    result, batch_id = runs["results"]["several"], runs["ids"]["several"]
    assert result.success, _failure(result)
    datasets = _completion(store, batch_id)["datasets"]
    assert {name: entry["kind"] for name, entry in datasets.items()} == {
        "wide": "layer", "countries": "layer", "sites": "layer", "per_country": "join",
        "wide_country": "join"}
    assert datasets["per_country"]["join"]["right"] == "wide"
    assert datasets["wide_country"]["join"]["left_columns"] == ["c0001"]

    wide = runs["wide"].to_crs(TARGET)
    countries = runs["countries"].to_crs(TARGET)
    countries["geometry"] = countries.geometry.make_valid()
    inside = gpd.sjoin(countries, wide, predicate="intersects")
    expected = inside.groupby("name")["c0007"].agg(["count", "sum"])
    per_country = lake_dataset(store, batch_id, "per_country", "name").set_index("name")
    assert len(per_country) == len(countries)
    counted = per_country[per_country["n"] > 0]
    assert counted["n"].to_dict() == expected["count"].to_dict()
    np.testing.assert_allclose(counted.loc[expected.index, "c7_sum"], expected["sum"])

    nearest = lake_dataset(store, batch_id, "wide_country", "c0001")
    assert list(nearest.columns[:3]) == ["c0001", "right_name", "distance"]
    assert "c0002" not in nearest.columns and len(nearest) == N_WIDE
    within = gpd.sjoin(wide, countries[["name", "geometry"]], predicate="within")
    by_c1 = nearest.set_index("c0001")
    assert len(within) > 0
    for c1, name in zip(within["c0001"], within["name"], strict=True):
        assert by_c1.loc[c1, "right_name"] == name and by_c1.loc[c1, "distance"] == 0
    completion = _completion(store, batch_id)
    lineage = {(doc["dataset"], doc["kind"]): doc for doc in
               ledger.lineage_for_batch(batch_id, completion["publication"])}
    # a join's lineage names its join and the inputs of its two layers; a layer's, no join
    assert lineage[("per_country", "join")]["join"]["name"] == "per_country"
    assert {i["layer"] for i in lineage[("per_country", "join")]["inputs"]} == {"countries",
                                                                               "wide"}
    assert lineage[("sites", "layer")]["join"] is None


def test_a_wide_layer_is_published_whole_and_loaded_with_the_joined_columns(runs, store):
    result, batch_id = runs["results"]["several"], runs["ids"]["several"]
    assert result.success, _failure(result)
    metadata = output_metadata(result, "load_and_join")
    # sites is in no join: never loaded; wide: c0001 (wide_country's left) and c0007 (summed)
    assert metadata["loaded_columns"] == {"wide": 2, "countries": "all"}
    wide = lake_dataset(store, batch_id, "wide", "point_id")
    attributes = [c for c in wide.columns if c not in ("geometry", "bbox", "_row_id")]
    assert attributes == ["point_id", *(f"c{i:04d}" for i in range(WIDE_COLUMNS))]
    assert wide["c1999"].tolist() == [i + 1_999.0 for i in range(N_WIDE)]


def test_a_wide_left_layer_read_whole_is_refused_before_the_transform(runs, store):
    result, batch_id = runs["results"]["too-wide"], runs["ids"]["too-wide"]
    assert not result.success
    step, message = _failure(result).split(": ", 1)
    assert step == "shard_batch"
    assert "layer 'wide' has 2,001 attribute columns; a PostgreSQL table holds at most 1,600 " \
           "columns" in message
    assert "join(s) ['wide_country'] read all of them as their left layer" in message
    assert "'left_columns'" in message
    # refused when the file was opened: no row of it was sorted into chunks
    assert not any("sharded layer" in line for line in runs["logs"]["too-wide"])
    assert any("sharded layer wide" in line for line in runs["logs"]["several"])
    assert not store.exists("data-lake", completion_key(batch_id))


def test_csv_attribute_types_are_inferred_and_overridden(runs, store):
    result, batch_id = runs["results"]["several"], runs["ids"]["several"]
    assert result.success, _failure(result)
    sites = lake_dataset(store, batch_id, "sites", "label")
    schema = _lake_schema(store, batch_id, "sites")
    assert {name: str(schema.field(name).type) for name in
            ("site_id", "code", "score", "open", "since", "label")} == {
        "site_id": "string",  # declared: would be int64
        "code": "string",  # a leading zero keeps a column text
        "score": "double",  # declared float64 (integers and an empty value)
        "open": "bool", "since": "date32[day]", "label": "string"}
    rows = sites.set_index("label")
    assert rows.loc["Paris", "site_id"] == "1" and rows.loc["Paris", "code"] == "0042"
    assert rows.loc["Berlin", "score"] == 8.0 and np.isnan(rows.loc["Madrid", "score"])
    assert list(rows["open"]) == [False, True, True]  # Berlin, Madrid, Paris
    assert str(rows.loc["Paris", "since"]) == "2020-05-01" and pd.isna(rows.loc["Madrid", "since"])


def _lake_schema(store, batch_id: str, dataset: str) -> pa.Schema:
    key = _completion(store, batch_id)["datasets"][dataset]["objects"][0]["key"]
    return pq.read_schema(io.BytesIO(store.get_bytes("data-lake", key)))
