"""GeoParquet encoding: the vectorised point paths agree with GEOS, files follow GeoParquet 1.1."""

import io
import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely

from libs.geoparquet import (
    COVERING,
    GEOMETRY,
    encode_frame,
    encode_wkb_table,
    geometries_to_wkb,
    geometry_bounds,
    geometry_type_names,
    plain_points,
    read_geoparquet,
    read_parquet_table,
    to_geoparquet_bytes,
    wkb_to_geometries,
)
from libs.sample_batch import synthetic_points

MIXED = np.array([
    shapely.Point(1.5, -2.25), None, shapely.from_wkt("POINT EMPTY"), shapely.Point(1, 2, 3),
    shapely.from_wkt("LINESTRING (0 0, 1 1)"), shapely.from_wkt("POLYGON ((0 0, 2 0, 2 2, 0 0))"),
    shapely.from_wkt("MULTIPOLYGON (((10 10, 11 10, 11 11, 10 10)))"),
], dtype=object)


def test_point_wkb_is_byte_identical_to_geos():
    points = shapely.points(np.random.default_rng(4).uniform(-1e7, 1e7, (1000, 2)))
    assert plain_points(points)
    ours = geometries_to_wkb(points)
    assert ours.to_pylist() == list(shapely.to_wkb(points, flavor="iso"))


def test_wkb_round_trips_every_kind_of_geometry():
    assert not plain_points(MIXED)
    back = wkb_to_geometries(geometries_to_wkb(MIXED))
    assert back[1] is None
    present = np.array([g is not None for g in MIXED])
    assert shapely.equals_exact(back[present], MIXED[present], 0).all()
    assert shapely.is_empty(back[2]) and shapely.has_z(back[3])


def test_point_decoding_equals_geos_and_leaves_empty_points_to_geos():
    points = shapely.points(np.random.default_rng(5).uniform(-180, 180, (500, 2)))
    wkb = pa.array(shapely.to_wkb(points, flavor="iso"), pa.binary())
    assert shapely.equals_exact(wkb_to_geometries(wkb), points, 0).all()
    with_empty = pa.array(shapely.to_wkb(np.array([points[0], shapely.from_wkt("POINT EMPTY")]),
                                         flavor="iso"), pa.binary())
    decoded = wkb_to_geometries(with_empty)
    assert shapely.is_empty(decoded).tolist() == [False, True]
    # a sliced array (non-zero offset) decodes its own rows
    assert shapely.equals_exact(wkb_to_geometries(wkb.slice(10, 5)), points[10:15], 0).all()


def test_bounds_and_types_match_shapely():
    present = np.array([g is not None for g in MIXED])
    np.testing.assert_array_equal(geometry_bounds(MIXED), shapely.bounds(MIXED))
    assert np.isnan(geometry_bounds(MIXED)[~present]).all()
    assert geometry_type_names(MIXED) == ["LineString", "MultiPolygon", "Point", "Point Z",
                                          "Polygon"]
    points = synthetic_points(100, seed=1).geometry.values
    np.testing.assert_array_equal(geometry_bounds(np.asarray(points)), shapely.bounds(points))


def test_file_is_geoparquet_1_1_with_a_float32_covering_that_contains_each_geometry():
    frame = gpd.GeoDataFrame(
        {"name": pd.array(["a", None, "c", "d", "e", "f", "g"], dtype=pd.ArrowDtype(pa.string())),
         "n": pd.array(range(7), dtype=pd.ArrowDtype(pa.int64()))},
        geometry=gpd.GeoSeries(MIXED, crs="EPSG:4326"))
    data, bbox, types = encode_frame(frame)
    table = pq.read_table(io.BytesIO(data))
    geo = json.loads(table.schema.metadata[b"geo"])
    column = geo["columns"][GEOMETRY]
    assert geo["version"] == "1.1.0" and geo["primary_column"] == GEOMETRY
    assert column["encoding"] == "WKB" and column["geometry_types"] == types
    assert column["crs"]["id"] == {"authority": "EPSG", "code": 4326}
    assert column["bbox"] == list(bbox) == [0.0, -2.25, 11.0, 11.0]
    assert column["covering"] == {COVERING: {n: [COVERING, n] for n in
                                             ("xmin", "ymin", "xmax", "ymax")}}
    assert table.column_names == ["name", "n", GEOMETRY, COVERING]
    covering = table.column(COVERING).combine_chunks()
    assert covering.type.field(0).type == pa.float32()
    assert covering.is_null().to_pylist() == [False, True, False, False, False, False, False]
    exact = shapely.bounds(MIXED)
    for i, box in enumerate(covering.to_pylist()):
        if box is None or np.isnan(exact[i, 0]):
            continue
        assert box["xmin"] <= exact[i, 0] and box["ymin"] <= exact[i, 1]
        assert box["xmax"] >= exact[i, 2] and box["ymax"] >= exact[i, 3]
    # geopandas reads it, and so does our reader, with the same values and types
    theirs = gpd.read_parquet(io.BytesIO(data))
    ours = read_geoparquet(data)
    assert list(ours.columns) == ["name", "n", GEOMETRY] and ours.crs == frame.crs
    assert ours["name"].dtype == pd.ArrowDtype(pa.string())
    assert ours["n"].tolist() == theirs["n"].tolist() == list(range(7))
    assert ours.geometry.is_empty.tolist() == theirs.geometry.is_empty.tolist()


@pytest.mark.parametrize("geometries", ["points", "mixed"])
def test_a_wkb_table_encodes_to_the_bytes_of_the_same_frame(geometries):
    """What the export writes from Arrow (points passed through as WKB, other geometries
    parsed and rewritten) is byte for byte what encoding the equivalent GeoDataFrame writes."""
    if geometries == "points":
        frame = synthetic_points(3000, seed=4).to_crs("EPSG:8857")
    else:
        frame = gpd.GeoDataFrame({"n": np.arange(len(MIXED)), "name": list("abcdefg")},
                                 geometry=gpd.GeoSeries(MIXED), crs="EPSG:4326")
    geoms = np.asarray(frame.geometry.values, dtype=object)
    table = pa.Table.from_pandas(pd.DataFrame(frame.drop(columns="geometry")),
                                 preserve_index=False)
    table = table.append_column(GEOMETRY, pa.array(shapely.to_wkb(geoms, flavor="iso"),
                                                   pa.binary()))
    crs = frame.crs.to_string()
    assert encode_wkb_table(table, crs) == to_geoparquet_bytes(frame)
    assert encode_wkb_table(table.slice(5), crs) == to_geoparquet_bytes(frame.iloc[5:])


@pytest.mark.parametrize("crs", ["EPSG:3857", None])
def test_encoding_is_deterministic_and_keeps_the_crs(crs):
    frame = synthetic_points(2000, seed=9)
    frame = frame.set_crs(crs, allow_override=True) if crs else frame.set_crs(None,
                                                                              allow_override=True)
    assert to_geoparquet_bytes(frame) == to_geoparquet_bytes(frame.copy())
    back = read_geoparquet(to_geoparquet_bytes(frame))
    assert (back.crs is None) if crs is None else back.crs.equals(frame.crs)
    assert shapely.equals_exact(np.asarray(back.geometry.values),
                                np.asarray(frame.geometry.values), 0).all()


def test_an_absent_crs_means_crs84_and_other_encodings_go_through_geopandas():
    frame = gpd.GeoDataFrame({"v": [1, 2]}, geometry=gpd.GeoSeries.from_xy([0, 1], [0, 1],
                                                                          crs="OGC:CRS84"))
    table = pq.read_table(io.BytesIO(to_geoparquet_bytes(frame)))
    geo = json.loads(table.schema.metadata[b"geo"])
    del geo["columns"][GEOMETRY]["crs"]
    sink = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({b"geo": json.dumps(geo)}), sink)
    assert read_geoparquet(sink.getvalue()).crs.equals("OGC:CRS84")
    native = io.BytesIO()
    frame.to_parquet(native, geometry_encoding="geoarrow")
    back = read_geoparquet(native.getvalue())
    assert back.geometry.name == GEOMETRY and back.geometry.x.tolist() == [0.0, 1.0]


def test_read_parquet_table_leaves_the_covering_out_and_keeps_the_rest():
    frame = synthetic_points(1_000, seed=8)
    data = to_geoparquet_bytes(frame)
    stored = pq.read_table(pa.BufferReader(data))
    assert COVERING in stored.column_names
    table = read_parquet_table(data)
    assert table.column_names == [c for c in stored.column_names if c != COVERING]
    assert table.equals(stored.drop_columns([COVERING]), check_metadata=True)
    assert b"geo" in table.schema.metadata
    plain = pa.table({"a": [1, 2], GEOMETRY: pa.array([b"\x01", b"\x02"], pa.binary())})
    sink = io.BytesIO()
    pq.write_table(plain, sink)
    assert read_parquet_table(sink.getvalue()).equals(plain)
