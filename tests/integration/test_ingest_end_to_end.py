"""The whole flow on the real local stack: landing → sensor → shard → Ray → PostGIS → lake."""

import hashlib
import io
import json
import uuid

import geopandas as gpd
import pyarrow.parquet as pq
import pyogrio
import pytest
from dagster import DagsterInstance

from libs.lake import completion_key
from libs.postgis import run_schema_name
from libs.sample_batch import synthetic_points
from tests.integration.pipeline import land_sample, request_for, run_ingest, sensor_tick

pytestmark = pytest.mark.integration

N_POINTS = 20_000


@pytest.fixture(scope="module")
def instance():
    with DagsterInstance.ephemeral() as inst:
        yield inst


@pytest.fixture(scope="module")
def ingested(stack_env, landing_store, tmp_path_factory, instance):
    """One batch run through the real job; several tests inspect what it left behind."""
    batch_id = f"e2e-{uuid.uuid4().hex[:12]}"
    tmp = tmp_path_factory.mktemp("batch")
    land_sample(landing_store, tmp, batch_id, n_points=N_POINTS)
    request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
    assert request is not None, "the sensor did not request a run for the landed batch"
    result = run_ingest(instance, request)
    return {"batch_id": batch_id, "folder": tmp / batch_id, "result": result}


def _read_lake_dataset(store, completion, dataset) -> gpd.GeoDataFrame:
    frames = []
    for obj in completion["datasets"][dataset]["objects"]:
        data = store.get_bytes("data-lake", obj["key"])
        assert hashlib.sha256(data).hexdigest() == obj["sha256"]
        frames.append(gpd.read_parquet(io.BytesIO(data)))
    return gpd.GeoDataFrame(gpd.pd.concat(frames, ignore_index=True), crs=frames[0].crs)


def test_run_succeeds_and_publishes_every_dataset(ingested, lake_reader):
    assert ingested["result"].success
    batch_id = ingested["batch_id"]
    completion = json.loads(lake_reader.get_bytes("data-lake", completion_key(batch_id)))
    assert completion["run_id"] == ingested["result"].run_id
    assert set(completion["datasets"]) == {"points", "countries", "points_per_country"}
    assert completion["datasets"]["points"]["rows"] == N_POINTS
    assert completion["datasets"]["countries"]["rows"] == 177
    assert completion["datasets"]["points_per_country"]["rows"] == 177
    listed = sorted(o.key for d in completion["datasets"].values()
                    for o in lake_reader.list("data-lake", d["prefix"]))
    named = sorted(o["key"] for d in completion["datasets"].values() for o in d["objects"])
    assert listed == named, "the lake holds objects the completion manifest does not name"


def test_layers_are_geoparquet_in_the_target_crs(ingested, lake_reader):
    completion = json.loads(lake_reader.get_bytes("data-lake", completion_key(ingested["batch_id"])))
    key = completion["datasets"]["points"]["objects"][0]["key"]
    metadata = pq.read_schema(io.BytesIO(lake_reader.get_bytes("data-lake", key))).metadata
    geo = json.loads(metadata[b"geo"])
    assert geo["version"] == "1.1.0"
    assert geo["columns"]["geometry"]["crs"]["id"] == {"authority": "EPSG", "code": 8857}
    points = _read_lake_dataset(lake_reader, completion, "points")
    expected = synthetic_points(N_POINTS, seed=42).to_crs("EPSG:8857")
    assert sorted(points["point_id"]) == sorted(expected["point_id"])
    merged = points.merge(expected, on="point_id", suffixes=("", "_expected"))
    assert merged.geometry.geom_equals_exact(gpd.GeoSeries(merged["geometry_expected"]),
                                             tolerance=1e-6).all()


def test_join_equals_geopandas_sjoin(ingested, lake_reader):
    completion = json.loads(lake_reader.get_bytes("data-lake", completion_key(ingested["batch_id"])))
    ours = _read_lake_dataset(lake_reader, completion, "points_per_country")
    folder = ingested["folder"]
    points = pyogrio.read_dataframe(folder / "points.fgb").to_crs("EPSG:8857")
    countries = pyogrio.read_dataframe(f"/vsizip/{folder / 'countries.zip'}").to_crs("EPSG:8857")
    countries["geometry"] = countries.geometry.make_valid()
    joined = gpd.sjoin(countries, points, predicate="intersects", how="inner")
    expected = joined.groupby("name").agg(point_count=("point_id", "size"),
                                          value_sum=("value", "sum"))
    ours = ours.set_index("name")
    assert int(ours["point_count"].sum()) == int(expected["point_count"].sum())
    for name, row in expected.iterrows():
        assert ours.loc[name, "point_count"] == row["point_count"], name
        assert ours.loc[name, "value_sum"] == pytest.approx(row["value_sum"]), name
    unmatched = ours[~ours.index.isin(expected.index)]
    assert (unmatched["point_count"] == 0).all() and unmatched["value_sum"].isna().all()


def test_ledger_records_run_and_lineage(ingested, ledger):
    batch_id, run_id = ingested["batch_id"], ingested["result"].run_id
    run = ledger.run(run_id)
    assert run["status"] == "SUCCESS" and run["batch_id"] == batch_id
    assert ledger.batch(batch_id)["run_ids"] == [run_id]
    lineage = ledger.lineage_for_batch(batch_id)
    assert {doc["dataset"] for doc in lineage} == {"points", "countries", "points_per_country"}
    folder = ingested["folder"]
    checksums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in (folder / "points.fgb", folder / "countries.zip")}
    for doc in lineage:
        assert doc["run_id"] == run_id and doc["rows"] > 0
        for source in doc["inputs"]:
            assert source["sha256"] == checksums[source["key"].rsplit("/", 1)[1]]
    join_doc = next(d for d in lineage if d["dataset"] == "points_per_country")
    assert {s["layer"] for s in join_doc["inputs"]} == {"points", "countries"}


def test_nothing_transient_is_left(ingested, store, pg):
    run_id = ingested["result"].run_id
    schemas = [r[0] for r in pg.execute("SELECT nspname FROM pg_namespace").fetchall()]
    assert run_schema_name(run_id) not in schemas
    assert list(store.list("etl-staging", f"runs/{run_id}/")) == []


def test_landing_objects_are_untouched(ingested, store):
    folder = ingested["folder"]
    for name in ("points.fgb", "countries.zip", "manifest.json"):
        landed = store.get_bytes("landing-zone", f"{ingested['batch_id']}/{name}")
        assert landed == (folder / name).read_bytes()
