"""Coordinate domain checks on the real stack: impossible coordinates never reach the lake.

Fixtures are written here: points and polygons in geographic (EPSG:4326) and projected
(EPSG:25833) sources, reprojected to a projected (EPSG:3857) and a geographic (EPSG:4326)
target. Out-of-domain rows land in ``<layer>_rejects`` with the offending value, the rest is
published with finite bounds; polar data is clamped under ``clip_to_domain`` and rejected
without it; swapped axes and ``policy: fail`` fail the run in transform, publishing nothing.
"""

import io
import json
import uuid

import geopandas as gpd
import pandas as pd
import pyarrow.parquet as pq
import pytest
import shapely
from dagster import DagsterInstance
from pyproj import CRS, Transformer

from libs.lake import completion_key
from libs.landing import land_batch
from tests.integration.pipeline import request_for, run_ingest, sensor_tick

pytestmark = pytest.mark.integration

TO_UTM = Transformer.from_crs("EPSG:4326", "EPSG:25833", always_xy=True)
POLAR = [shapely.Polygon([(0, 80), (10, 80), (10, 90.2), (0, 90.2), (0, 80)]),
         shapely.Polygon([(20, 84), (30, 84), (30, 90.0000001), (20, 90.0000001), (20, 84)]),
         shapely.box(15, 59, 16, 60)]


def _write(folder, name, geoms, crs, layer=None):
    frame = gpd.GeoDataFrame({"fid": list(range(1, len(geoms) + 1))}, geometry=list(geoms),
                             crs=crs)
    frame.to_parquet(folder / f"{name}.parquet")
    return {"path": f"{name}.parquet", "layer": layer or name, "format": "geoparquet",
            "source_crs": crs}


def _batch(tmp_path, landing_store, files, target, recipes=None, join=("a", "b")):
    batch_id = f"domain-{uuid.uuid4().hex[:10]}"
    folder = tmp_path / batch_id
    folder.mkdir(parents=True)
    entries = [_write(folder, name, geoms, crs) for name, (geoms, crs) in files.items()]
    manifest = {"manifest_version": 1, "batch_id": batch_id, "target_crs": target,
                "files": entries, "recipes": recipes or {},
                # these layers are mostly out-of-domain rows on purpose: no reject fraction
                "max_reject_fraction": {"*": 1.0},
                "join": {"name": "joined", "left": join[0], "right": join[1],
                         "predicate": "intersects", "how": "left",
                         "aggregations": [{"function": "count", "output": "n"}]}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    land_batch(landing_store, folder, batch_id)
    with DagsterInstance.ephemeral() as instance:
        request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
        assert request is not None
        result = run_ingest(instance, request, raise_on_error=False)
    return batch_id, result


def _dataset(store, completion, name) -> gpd.GeoDataFrame:
    objects = completion["datasets"][name]["objects"]
    frames = [gpd.read_parquet(io.BytesIO(store.get_bytes("data-lake", o["key"])))
              for o in objects]
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=frames[0].crs)


def _covering_is_finite(store, completion, name) -> bool:
    for o in completion["datasets"][name]["objects"]:
        table = pq.read_table(io.BytesIO(store.get_bytes("data-lake", o["key"])))
        geo = json.loads(table.schema.metadata[b"geo"])["columns"]["geometry"]
        bbox = table.column("bbox").combine_chunks()
        values = [v for f in ("xmin", "ymin", "xmax", "ymax")
                  for v in bbox.field(f).to_pylist() if v is not None]
        if not all(abs(v) < float("inf") for v in values + geo.get("bbox", [])):
            return False
    return True


def _failure(result) -> tuple[str, str]:
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    return failure.step_key, failure.event_specific_data.error.to_string()


def _nothing_published(store, batch_id, datasets) -> bool:
    return (not store.exists("data-lake", completion_key(batch_id))
            and all(not list(store.list("data-lake", f"{d}/{batch_id}/")) for d in datasets))


@pytest.fixture(scope="module")
def to_mercator(stack_env, store, landing_store, tmp_path_factory):
    """Geographic and projected sources, a projected target, polar data with and without
    clip_to_domain: one run."""
    x, y = TO_UTM.transform([15.0, 10.0], [60.0, 62.0])
    files = {
        # rows 2-3 outside the source (lat 120, lon 1e300), row 4 outside the target (89.5 N)
        "a": ([shapely.Point(10, 50), shapely.Point(10, 120), shapely.Point(1e300, 0),
               shapely.Point(20, 89.5), shapely.Point(5, 45)], "EPSG:4326"),
        # row 3 far outside ETRS89 / UTM 33N's area of use
        "b": ([shapely.Point(x[0], y[0]), shapely.Point(x[1], y[1]),
               shapely.Point(1e12, 6e6)], "EPSG:25833"),
        "polar": (POLAR, "EPSG:4326"),
        "polar_clipped": (POLAR, "EPSG:4326"),
    }
    recipes = {"polar_clipped": [{"step": "reproject", "clip_to_domain": True},
                                 {"step": "make_valid"}]}
    batch_id, result = _batch(tmp_path_factory.mktemp("merc"), landing_store, files,
                              "EPSG:3857", recipes)
    assert result.success
    return json.loads(store.get_bytes("data-lake", completion_key(batch_id)))


def test_out_of_domain_rows_are_rejected_with_the_offending_value(to_mercator, store):
    a = _dataset(store, to_mercator, "a")
    assert sorted(a["fid"]) == [1, 5]
    rejects = _dataset(store, to_mercator, "a_rejects")
    reasons = dict(zip(rejects["_attributes"].map(lambda s: json.loads(s)["fid"]),
                       rejects["_reject_reason"], strict=True))
    assert sorted(reasons) == [2, 3, 4]
    assert "(10.0, 120.0)" in reasons[2] and "outside the source CRS 'WGS 84'" in reasons[2]
    assert "1e+300" in reasons[3]
    assert "outside the target CRS 'WGS 84 / Pseudo-Mercator'" in reasons[4]
    assert rejects["_reject_step"].eq("reproject").all()
    b_rejects = _dataset(store, to_mercator, "b_rejects")
    assert b_rejects["_attributes"].map(lambda s: json.loads(s)["fid"]).tolist() == [3]
    assert "outside the source CRS 'ETRS89 / UTM zone 33N'" in b_rejects["_reject_reason"][0]
    assert sorted(_dataset(store, to_mercator, "b")["fid"]) == [1, 2]
    for name in ("a", "a_rejects", "b", "b_rejects", "joined"):
        assert _covering_is_finite(store, to_mercator, name), name


def test_polar_data_is_clamped_with_clip_to_domain_and_rejected_without(to_mercator, store):
    clipped = _dataset(store, to_mercator, "polar_clipped")
    assert sorted(clipped["fid"]) == [1, 2, 3]
    edge = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(
        0.0, CRS("EPSG:3857").area_of_use.north)[1]
    assert clipped.total_bounds[3] == pytest.approx(edge, rel=1e-9)
    assert "polar_clipped_rejects" not in to_mercator["datasets"]
    raw = _dataset(store, to_mercator, "polar")
    assert raw["fid"].tolist() == [3]
    rejects = _dataset(store, to_mercator, "polar_rejects")
    assert sorted(rejects["_attributes"].map(lambda s: json.loads(s)["fid"])) == [1, 2]


def test_geographic_target_never_publishes_latitudes_over_90(stack_env, store, landing_store,
                                                               tmp_path):
    x, y = TO_UTM.transform([15.0], [60.0])
    files = {"a": ([shapely.Point(10, 50), shapely.Point(10, 200), shapely.Point(0, 1e300)],
                   "EPSG:4326"),
             "b": ([shapely.Point(x[0], y[0]), shapely.Point(-5e9, 1.0)], "EPSG:25833")}
    batch_id, result = _batch(tmp_path, landing_store, files, "EPSG:4326")
    assert result.success
    completion = json.loads(store.get_bytes("data-lake", completion_key(batch_id)))
    a, b = _dataset(store, completion, "a"), _dataset(store, completion, "b")
    assert a["fid"].tolist() == [1] and b["fid"].tolist() == [1]
    assert completion["datasets"]["a_rejects"]["rows"] == 2
    assert completion["datasets"]["b_rejects"]["rows"] == 1
    assert all(abs(v) <= 90 for v in (a.total_bounds[1], a.total_bounds[3]))
    for name in ("a", "a_rejects", "b", "b_rejects"):
        assert _covering_is_finite(store, completion, name), name


@pytest.mark.parametrize("case", ["swapped", "policy_fail"])
def test_swapped_axes_and_policy_fail_stop_the_run_in_transform(stack_env, store, landing_store,
                                                                tmp_path, case):
    # (lat, lon) of Sydney, Tokyo, Honolulu and Berlin: three latitudes over 90
    swapped = [shapely.Point(-33.9, 151.2), shapely.Point(35.7, 139.7),
               shapely.Point(21.3, -157.8), shapely.Point(52.5, 13.4)]
    fine = [shapely.Point(151.2, -33.9), shapely.Point(10, 95), shapely.Point(0, 0)]
    recipes = {"a": [{"step": "reproject", "policy": "fail"}]} if case == "policy_fail" else {}
    files = {"a": (swapped if case == "swapped" else fine, "EPSG:4326"),
             "b": ([shapely.Point(1, 1)], "EPSG:4326")}
    batch_id, result = _batch(tmp_path, landing_store, files, "EPSG:8857", recipes)
    assert not result.success
    step, message = _failure(result)
    assert step == "transform_chunks", message
    if case == "swapped":
        assert "did you swap x and y?" in message and "3 of 4 geometries" in message, message
    else:
        assert "reproject failed on _row_id 1" in message and "(10.0, 95.0)" in message, message
        assert "policy is 'fail'" in message
    assert _nothing_published(store, batch_id, ["a", "b", "joined", "a_rejects"])
