"""What users land, accepted (issue 27): 3D layers, mixed geometry families, empty layers.

Each batch is written by the test (seeded shapely geometries in a GeoPackage or GeoJSON),
landed, requested by the real sensor and run by the real ingest job against the local stack;
the lake's datasets are read back and compared with what was landed. The batches run in one
Dagster instance, one after another, and are small (tens of features).
"""

import io
import json
import uuid
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
import shapely
from dagster import DagsterInstance

from libs.geoparquet import to_geoparquet_bytes
from libs.lake import completion_key
from libs.landing import land_batch
from tests.integration.pipeline import request_for, run_ingest, sensor_tick

pytestmark = pytest.mark.integration
CRS = "EPSG:3857"


def _grid_polygons(n: int, z: float | None) -> list:
    """``n`` 10 km squares side by side, each at height ``z + i`` when z is given."""
    out = []
    for i in range(n):
        x0 = i * 20_000.0
        ring = [(x0, 0.0), (x0 + 10_000, 0.0), (x0 + 10_000, 10_000), (x0, 10_000), (x0, 0.0)]
        if z is not None:
            ring = [(x, y, z + i) for x, y in ring]
        out.append(shapely.Polygon(ring))
    return out


def _points_in(polygons: list, per: int, z: float | None) -> list:
    """``per`` points inside each polygon (2D bounds), at height ``z + k`` when z is given."""
    out = []
    for i, polygon in enumerate(polygons):
        xmin, ymin, _, _ = polygon.bounds
        for k in range(per):
            xy = (xmin + 1_000.0 + 800.0 * k, ymin + 5_000.0 + 10.0 * i)
            out.append(shapely.Point(*xy, z + k) if z is not None else shapely.Point(*xy))
    return out


def _frame(geoms: list, name: str) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame({f"{name}_id": np.arange(len(geoms), dtype="int64")},
                            geometry=geoms, crs=CRS)


def _land(landing_store, folder: Path, batch_id: str, files: list[dict], join: dict | None,
          **extra) -> None:
    manifest = {"manifest_version": 1, "batch_id": batch_id, "target_crs": CRS,
                "files": files, **extra}
    if join is not None:
        manifest["join"] = join
    (folder / "manifest.json").write_text(json.dumps(manifest))
    land_batch(landing_store, folder, batch_id)


def _dataset(store, batch_id: str, name: str) -> gpd.GeoDataFrame:
    completion = json.loads(store.get_bytes("data-lake", completion_key(batch_id)))
    objects = completion["datasets"][name]["objects"]
    parts = [gpd.read_parquet(io.BytesIO(store.get_bytes("data-lake", o["key"])))
             for o in objects]
    return pd.concat(parts, ignore_index=True) if parts else None


def _geo_meta(store, batch_id: str, name: str) -> dict:
    import pyarrow.parquet as pq
    completion = json.loads(store.get_bytes("data-lake", completion_key(batch_id)))
    key = completion["datasets"][name]["objects"][0]["key"]
    meta = pq.read_schema(io.BytesIO(store.get_bytes("data-lake", key))).metadata
    return json.loads(meta[b"geo"])


def _run(batch_id: str):
    with DagsterInstance.ephemeral() as instance:
        request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
        assert request is not None, f"the sensor requested no run for {batch_id}"
        return run_ingest(instance, request, raise_on_error=False)


def _count_join(left: str, right: str) -> dict:
    return {"name": "joined", "left": left, "right": right, "predicate": "intersects",
            "how": "left", "aggregations": [{"function": "count", "output": "n"}]}


def test_3d_points_lines_polygons_keep_z_and_m_through_postgis_and_the_lake(
        stack_env, store, landing_store, tmp_path):
    batch_id = f"geom-3d-{uuid.uuid4().hex[:8]}"
    folder = tmp_path / batch_id
    folder.mkdir()
    polygons = _grid_polygons(5, z=100.0)
    points = _points_in(polygons, 3, z=7.0)
    lines = [shapely.LineString([(p.x, p.y, p.z), (p.x + 50, p.y + 50, p.z + 1)])
             for p in points[::3]]
    frames = {"zones": _frame(polygons, "zone"), "wells": _frame(points, "well"),
              "pipes": _frame(lines, "pipe")}
    # 2D and 3D points in one layer: an untyped column in PostGIS; and a layer made 2D
    masts = _frame([shapely.Point(1, 2), shapely.Point(3, 4, 5)], "mast")
    for layer, frame in {**frames, "masts": masts, "flat": frames["pipes"]}.items():
        pyogrio.write_dataframe(frame, folder / f"{layer}.gpkg", layer=layer)
    # measures (M) too, as GeoParquet (GDAL writes no ISO M from geopandas): kept, since the
    # layer is landed in the target CRS and nothing moves its coordinates
    gauges = _frame([shapely.from_wkt("LINESTRING ZM (0 0 1 7, 10 10 2 8)"),
                     shapely.from_wkt("LINESTRING ZM (50 50 3 9, 60 60 4 10.5)")], "gauge")
    (folder / "gauges.parquet").write_bytes(to_geoparquet_bytes(gauges))
    files = [{"path": f"{layer}.gpkg", "layer": layer, "format": "gpkg"}
             for layer in (*frames, "masts", "flat")]
    files.append({"path": "gauges.parquet", "layer": "gauges", "format": "geoparquet"})
    # an aggregating intersects of polygons with points: the join runs part by part
    join = {"name": "joined", "left": "zones", "right": "wells", "predicate": "intersects",
            "how": "left", "aggregations": [{"function": "count", "output": "n"},
                                            {"function": "sum", "column": "well_id",
                                             "output": "well_sum"}]}
    _land(landing_store, folder, batch_id, files, join,
          recipes={"flat": [{"step": "force_2d"}, {"step": "reproject"}]})

    result = _run(batch_id)
    assert result.success, "a batch of 3D layers is ingested"
    for layer, frame in frames.items():
        ours = _dataset(store, batch_id, layer).sort_values(f"{layer[:-1]}_id"
                                                             if layer != "wells" else "well_id")
        assert shapely.has_z(ours.geometry.values).all(), f"{layer}: Z kept in the lake"
        assert shapely.equals_exact(ours.geometry.values, frame.geometry.values,
                                    tolerance=1e-6).all()
        np.testing.assert_array_equal(shapely.get_coordinates(ours.geometry.values, include_z=True),
                                      shapely.get_coordinates(frame.geometry.values, include_z=True))
        kinds = _geo_meta(store, batch_id, layer)["columns"]["geometry"]["geometry_types"]
        assert all(k.endswith(" Z") for k in kinds), kinds
    ours = _dataset(store, batch_id, "masts").sort_values("mast_id")
    assert list(shapely.has_z(ours.geometry.values)) == [False, True]
    ours = _dataset(store, batch_id, "gauges").sort_values("gauge_id")
    assert list(ours.geometry.to_wkt()) == list(gauges.geometry.to_wkt())  # Z and M intact
    assert _geo_meta(store, batch_id, "gauges")["columns"]["geometry"]["geometry_types"] == [
        "LineString Z"]  # GeoParquet has no M
    flat = _dataset(store, batch_id, "flat").sort_values("pipe_id")
    assert not shapely.has_z(flat.geometry.values).any()
    assert shapely.equals(flat.geometry.values, frames["pipes"].geometry.values).all()
    # the join ran through PostGIS on the 3D tables (2D predicate) and carried Z out again
    joined = _dataset(store, batch_id, "joined").sort_values("zone_id")
    assert list(joined["n"]) == [3] * 5
    assert list(joined["well_sum"]) == [9 * i + 3 for i in range(5)]
    assert shapely.has_z(joined.geometry.values).all()
    np.testing.assert_array_equal(
        shapely.get_coordinates(joined.geometry.values, include_z=True),
        shapely.get_coordinates(frames["zones"].geometry.values, include_z=True))


def _mixed_features() -> gpd.GeoDataFrame:
    """One GeoPackage layer of "features": 4 points, 2 lines and 3 polygons, interleaved."""
    polygons = _grid_polygons(3, z=None)
    points = _points_in(polygons[:2], 2, z=None)
    lines = [shapely.LineString([(0.0, 20_000.0), (50_000.0, 20_000.0)]),
             shapely.LineString([(5_000.0, -5_000.0), (5_000.0, 15_000.0)])]
    geoms = [points[0], polygons[0], lines[0], points[1], polygons[1], points[2], lines[1],
             polygons[2], points[3]]
    return gpd.GeoDataFrame({"feature_id": np.arange(len(geoms), dtype="int64"),
                             "kind": [g.geom_type for g in geoms]}, geometry=geoms, crs=CRS)


def test_a_mixed_layer_kept_whole_and_an_empty_layer_join_and_publish(
        stack_env, store, landing_store, tmp_path):
    """Default ``geometry_families: mixed``: one dataset of every family (a generic geometry
    column in PostGIS); an empty layer is published with 0 rows and its columns, and the join
    with it as the left layer runs and is published with 0 rows and its columns too."""
    batch_id = f"geom-mixed-{uuid.uuid4().hex[:8]}"
    folder = tmp_path / batch_id
    folder.mkdir()
    features = _mixed_features()
    pyogrio.write_dataframe(features, folder / "features.gpkg", layer="features",
                            geometry_type="Unknown")
    empty = gpd.GeoDataFrame({"name": pd.Series([], dtype="string"),
                              "height": pd.Series([], dtype="float64")},
                             geometry=gpd.GeoSeries([], crs=CRS))
    pyogrio.write_dataframe(empty, folder / "towers.gpkg", layer="towers", geometry_type="Point")
    files = [{"path": "features.gpkg", "layer": "features", "format": "gpkg"},
             {"path": "towers.gpkg", "layer": "towers", "format": "gpkg"}]
    _land(landing_store, folder, batch_id, files, _count_join("towers", "features"))

    result = _run(batch_id)
    assert result.success, "a mixed layer and an empty layer are ingested"
    ours = _dataset(store, batch_id, "features").sort_values("feature_id")
    assert list(ours["kind"]) == list(features["kind"])
    assert shapely.equals_exact(ours.geometry.values, features.geometry.values, 1e-6).all()
    assert sorted(_geo_meta(store, batch_id, "features")["columns"]["geometry"][
        "geometry_types"]) == ["LineString", "Point", "Polygon"]
    towers = _dataset(store, batch_id, "towers")
    assert len(towers) == 0 and {"name", "height", "geometry"} <= set(towers.columns)
    joined = _dataset(store, batch_id, "joined")
    assert len(joined) == 0 and ["name", "height", "n", "geometry"] == list(joined.columns)


def test_a_mixed_layer_split_into_one_dataset_per_family(stack_env, store, landing_store,
                                                          tmp_path):
    """``geometry_families: split``: the layer feeds ``features_points``, ``_lines`` and
    ``_polygons``, each a dataset of one family, and a join names them."""
    batch_id = f"geom-split-{uuid.uuid4().hex[:8]}"
    folder = tmp_path / batch_id
    folder.mkdir()
    features = _mixed_features()
    pyogrio.write_dataframe(features, folder / "features.gpkg", layer="features",
                            geometry_type="Unknown")
    files = [{"path": "features.gpkg", "layer": "features", "format": "gpkg",
              "geometry_families": "split"}]
    _land(landing_store, folder, batch_id, files,
          _count_join("features_polygons", "features_points"))

    result = _run(batch_id)
    assert result.success, "a split mixed layer is ingested"
    for suffix, kind in (("points", "Point"), ("lines", "LineString"), ("polygons", "Polygon")):
        ours = _dataset(store, batch_id, f"features_{suffix}").sort_values("feature_id")
        expected = features[features["kind"] == kind]
        assert list(ours["feature_id"]) == list(expected["feature_id"]), suffix
        assert shapely.equals_exact(ours.geometry.values, expected.geometry.values, 1e-6).all()
        assert _geo_meta(store, batch_id, f"features_{suffix}")["columns"]["geometry"][
            "geometry_types"] == [kind]
    joined = _dataset(store, batch_id, "joined").sort_values("feature_id")
    assert list(joined["n"]) == [2, 2, 0], "two points in each of the first two squares"
