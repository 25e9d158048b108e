"""The coordinate-array path of the transform (libs/transformations/arrays.py): byte-identical
to the general path whenever it is taken, and not taken whenever it could differ."""

import datetime as dt
import io
import struct

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import shapely
from pyproj import CRS

from libs.geoparquet import to_geoparquet_bytes
from libs.manifest.recipe import (
    DEFAULT_RECIPE,
    DropEmpty,
    FilterBBox,
    MakeValid,
    PromoteToMulti,
    Rename,
    Reproject,
    effective_recipe,
)
from libs.sample_batch import synthetic_points
from libs.transformations import arrays as arrays_module
from libs.transformations import chunk as chunk_module
from libs.transformations import transform_chunk_bytes
from libs.wkb_layout import wkb_layout


def points_chunk(n: int = 2_000, seed: int = 7, **extra) -> bytes:
    """Points as sharding writes them, with attribute types of every common kind."""
    frame = synthetic_points(n, seed)
    rng = np.random.default_rng(seed)
    frame["flag"] = rng.random(n) > 0.5
    frame["when"] = pd.Timestamp("2026-01-01") + pd.to_timedelta(np.arange(n), unit="s")
    frame["day"] = [dt.date(2026, 1, 1 + i % 28) for i in range(n)]
    frame["maybe"] = pd.array([None if i % 5 == 0 else i for i in range(n)], dtype="Int64")
    frame["label"] = [None if i % 7 == 0 else f"p{i}" for i in range(n)]
    for name, values in extra.items():
        frame[name] = values
    return to_geoparquet_bytes(frame)


def both_paths(data: bytes, steps, target: str, row_offset: int = 0):
    """(array path result or None, general path result) for the same input."""
    taken = []

    def spy(*args, **kwargs):
        result = arrays_module.transform_array_chunk(*args, **kwargs)
        taken.append(result is not None)
        return result

    original = chunk_module.transform_array_chunk
    chunk_module.transform_array_chunk = spy
    try:
        fast = transform_chunk_bytes(data, steps, target, row_offset)
        chunk_module.transform_array_chunk = lambda *a, **k: None
        general = transform_chunk_bytes(data, steps, target, row_offset)
    finally:
        chunk_module.transform_array_chunk = original
    return (fast if taken == [True] else None), general


RECIPES = [
    (effective_recipe(DEFAULT_RECIPE), "EPSG:8857"),  # reproject + make_valid repair
    ([Reproject()], "EPSG:3857"),  # already in the target CRS: nothing moves
    ([Reproject(), MakeValid(policy="fail"), DropEmpty(policy="fail")], "EPSG:4326"),
    ([MakeValid(policy="reject"), Reproject(), DropEmpty(), Reproject()], "EPSG:3395"),
]


@pytest.mark.parametrize("steps, target", RECIPES)
def test_point_path_output_is_byte_identical_to_the_general_path(steps, target):
    data = points_chunk()
    fast, general = both_paths(data, steps, target, row_offset=12_345)
    assert fast is not None, "the point path should have been taken"
    assert fast.data == general.data
    assert (fast.rows_in, fast.rows_out, fast.rows_rejected) == (2_000, 2_000, 0)
    assert (fast.bbox, fast.geometry_types, fast.reject_reasons, fast.rejects) == (
        general.bbox, general.geometry_types, general.reject_reasons, general.rejects)


@pytest.mark.parametrize("case", ["null geometry", "empty point", "3D point",
                                  "outside the target CRS", "renaming step", "bbox filter",
                                  "promote to multi"])
def test_point_path_steps_aside_whenever_the_result_could_differ(case):
    frame = synthetic_points(50, 3)
    steps, target = effective_recipe(DEFAULT_RECIPE), "EPSG:8857"
    geoms = np.asarray(frame.geometry.values, dtype=object)
    if case == "null geometry":
        geoms[3] = None
    elif case == "empty point":
        geoms[3] = shapely.from_wkt("POINT EMPTY")
    elif case == "3D point":
        geoms[3] = shapely.Point(1.0, 2.0, 3.0)
    elif case == "outside the target CRS":
        # an orthographic view of one hemisphere: points on the far side are not finite
        target = "+proj=ortho +lat_0=0 +lon_0=0 +datum=WGS84 +units=m +no_defs"
    elif case == "renaming step":
        steps = [*steps, Rename(columns={"value": "amount"})]
    elif case == "bbox filter":
        steps = [*steps, FilterBBox(bbox=(-1e6, -1e6, 1e6, 1e6))]
    else:
        steps = [*steps, PromoteToMulti()]
    frame = frame.set_geometry(gpd.GeoSeries(geoms, crs=frame.crs))
    fast, general = both_paths(to_geoparquet_bytes(frame), steps, target)
    assert fast is None, f"the array path must not run with {case}"
    assert general.rows_in == 50


def test_point_path_with_no_attributes_and_a_zero_row_offset():
    frame = synthetic_points(10, 1)[["geometry"]]
    fast, general = both_paths(to_geoparquet_bytes(frame), [Reproject()], "EPSG:4326")
    assert fast is not None and fast.data == general.data


def _ring(rng: np.random.Generator, x: float, y: float, size: float) -> np.ndarray:
    """A closed convex quadrilateral around (x, y): a square with jittered corners."""
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
    ring = corners * size * rng.uniform(0.8, 1.0, (4, 1)) + (x, y)
    return np.vstack([ring, ring[:1]])


def shapes(kind: str, n: int, rng: np.random.Generator) -> list:
    """``n`` valid geometries of ``kind`` in EPSG:3857 around random places."""
    out = []
    for _ in range(n):
        x, y = rng.uniform(-2e7, 2e7), rng.uniform(-8e6, 1.2e7)
        size = rng.uniform(100.0, 5_000.0)
        if kind == "lines":
            k = int(rng.integers(2, 7))
            out.append(shapely.LineString(np.column_stack([x + rng.uniform(-size, size, k),
                                                           y + rng.uniform(-size, size, k)])))
        elif kind == "polygons with holes":
            holes = [_ring(rng, x + dx * size / 2, y, size / 8)
                     for dx in (-1, 1)[:int(rng.integers(0, 3))]]
            out.append(shapely.Polygon(_ring(rng, x, y, size), holes))
        elif kind == "multipolygons":
            parts = int(rng.integers(1, 4))
            out.append(shapely.MultiPolygon([shapely.Polygon(_ring(rng, x + 3 * i * size, y, size))
                                             for i in range(parts)]))
        elif kind == "multilines":
            out.append(shapely.MultiLineString([[(x + i * size, y), (x + i * size, y + size),
                                                 (x + (i + 1) * size, y + size)]
                                                for i in range(int(rng.integers(1, 4)))]))
        else:  # multipoints
            out.append(shapely.MultiPoint(np.column_stack([
                x + rng.uniform(-size, size, 3), y + rng.uniform(-size, size, 3)])))
    return out


def shapes_chunk(geoms: list, seed: int = 5) -> bytes:
    frame = synthetic_points(len(geoms), seed)
    frame["day"] = [dt.date(2026, 1, 1 + i % 28) for i in range(len(geoms))]
    return to_geoparquet_bytes(frame.set_geometry(gpd.GeoSeries(geoms, crs=frame.crs)))


@pytest.mark.parametrize("kind", ["lines", "polygons with holes", "multipolygons",
                                  "multilines", "multipoints", "mixed"])
@pytest.mark.parametrize("steps, target", RECIPES)
def test_array_path_is_byte_identical_for_lines_polygons_and_multis(kind, steps, target):
    rng = np.random.default_rng(11)
    if kind == "mixed":
        geoms = [g for k in ("lines", "polygons with holes", "multipolygons", "multipoints")
                 for g in shapes(k, 100, rng)]
        geoms += list(synthetic_points(100, 2).geometry.values)
        geoms = [geoms[i] for i in rng.permutation(len(geoms))]
    else:
        geoms = shapes(kind, 500, rng)
    fast, general = both_paths(shapes_chunk(geoms), steps, target, row_offset=777)
    assert fast is not None, "the array path should have been taken"
    assert fast.data == general.data
    assert (fast.rows_in, fast.rows_out, fast.rows_rejected) == (len(geoms), len(geoms), 0)
    assert (fast.bbox, fast.geometry_types) == (general.bbox, general.geometry_types)


def test_array_path_bounds_are_the_shells_as_geos_has_them():
    """Without make_valid an invalid polygon passes through: its bounds (here a hole outside
    the shell) must still be those of the general path, the shell's envelope."""
    rng = np.random.default_rng(2)
    geoms = shapes("polygons with holes", 50, rng)
    geoms[7] = shapely.Polygon([(0, 0), (10, 0), (10, 10), (0, 10), (0, 0)],
                               [[(20, 20), (30, 20), (30, 30), (20, 30), (20, 20)]])
    assert not shapely.is_valid(geoms[7])
    fast, general = both_paths(shapes_chunk(geoms), [Reproject()], "EPSG:8857")
    assert fast is not None and fast.data == general.data and fast.bbox == general.bbox


BOW_TIE = shapely.Polygon([(0, 0), (10, 10), (10, 0), (0, 10), (0, 0)])


@pytest.mark.parametrize("steps, target", [
    (effective_recipe(DEFAULT_RECIPE), "EPSG:8857"),  # invalid after reprojecting
    ([MakeValid(), DropEmpty(), MakeValid()], "EPSG:3857"),  # invalid in the source
])
def test_array_path_repairs_invalid_rows_as_the_general_path_does(steps, target):
    """Rows make_valid repairs are repaired by GEOS alone and spliced in, the rest stay on
    arrays: a few quadrilaterals across the antimeridian fold over in Equal Earth, and one
    bow-tie is invalid from the start."""
    rng = np.random.default_rng(8)
    geoms = shapes("polygons with holes", 200, rng) + shapes("lines", 100, rng)
    for i, y in enumerate((0.0, 1e6, -2e6)):  # one corner past x = 20,037,508 m (180°E)
        geoms[10 + 40 * i] = shapely.Polygon([(20_030_000, y), (20_038_000, y),
                                              (20_036_000, y + 5_000), (20_030_000, y + 5_000)])
    geoms[77] = BOW_TIE
    geoms[250] = shapely.LineString([(1, 1), (1, 1), (2, 2)])  # valid: two distinct points
    fast, general = both_paths(shapes_chunk(geoms), steps, target)
    assert fast is not None, "the array path should have been taken"
    assert fast.data == general.data
    assert (fast.bbox, fast.geometry_types) == (general.bbox, general.geometry_types)
    assert "MultiPolygon" in fast.geometry_types  # the repaired bow-tie
    if target == "EPSG:8857":  # the folded quadrilaterals were repaired too
        out = gpd.read_parquet(io.BytesIO(fast.data))
        assert shapely.is_valid(out.geometry.values).all()
        assert (out.geometry.area.iloc[[10, 50, 90]] > 0).all()


@pytest.mark.parametrize("case", ["bow-tie polygon, rejected", "bow-tie, repaired, reprojected",
                                  "line of one repeated point", "empty polygon", "empty part",
                                  "3D line", "geometry collection", "null geometry"])
def test_array_path_steps_aside_when_geometries_are_invalid_empty_or_other(case):
    rng = np.random.default_rng(4)
    geoms = shapes("polygons with holes", 30, rng) + shapes("lines", 30, rng)
    steps = effective_recipe(DEFAULT_RECIPE)
    if case == "bow-tie polygon, rejected":
        steps = [Reproject(), MakeValid(policy="reject")]
    elif case == "bow-tie, repaired, reprojected":
        steps = [MakeValid(), Reproject()]
    geoms[5] = {
        "bow-tie polygon, rejected": BOW_TIE,
        "bow-tie, repaired, reprojected": BOW_TIE,
        "line of one repeated point": shapely.LineString([(5, 5), (5, 5), (5, 5)]),
        "empty polygon": shapely.from_wkt("POLYGON EMPTY"),
        "empty part": shapely.from_wkt("MULTILINESTRING ((0 0, 1 1), EMPTY)"),
        "3D line": shapely.LineString([(0, 0, 1), (1, 1, 1)]),
        "geometry collection": shapely.GeometryCollection([shapely.Point(1, 1)]),
        "null geometry": None,
    }[case]
    fast, general = both_paths(shapes_chunk(geoms), steps, "EPSG:8857")
    assert fast is None, f"the array path must not run with {case}"
    assert general.rows_in == 60


def _wkb(*values: bytes) -> pa.Array:
    return pa.array(list(values), pa.binary())


def test_wkb_walk_refuses_what_it_cannot_copy_exactly():
    line = shapely.to_wkb(shapely.LineString([(0, 0), (1, 1)]), flavor="iso")
    ring = [(0, 0), (1, 0), (1, 1), (0, 0)]
    polygon = shapely.to_wkb(shapely.Polygon(ring), flavor="iso")
    layout = wkb_layout(_wkb(line, polygon))
    assert layout is not None
    assert (layout.count.tolist(), layout.kind.tolist()) == ([2, 4], [1, 2])
    big_endian = shapely.to_wkb(shapely.LineString([(0, 0), (1, 1)]), byte_order=0)
    unclosed = polygon[:-16] + struct.pack("<dd", 0.5, 0.5)
    multi_of_lines_in_polygon_slot = (b"\x01" + struct.pack("<II", 6, 1) + line)
    for bad in (big_endian, line[:-1], line + b"\x00", multi_of_lines_in_polygon_slot,
                b"\x01" + struct.pack("<I", 7) + struct.pack("<I", 0)):
        assert wkb_layout(_wkb(line, bad)) is None, bad
    assert wkb_layout(_wkb(unclosed)) is not None  # the walk reads it; the path refuses it:
    frame_parts = (pd.DataFrame({"a": [1]}), _wkb(unclosed), CRS.from_epsg(3857))
    planned = pa.schema([("_row_id", pa.int64()), ("a", pa.int64()), ("geometry", pa.binary())])
    assert arrays_module.transform_array_chunk(frame_parts, [Reproject()], "EPSG:4326", 0,
                                               planned) is None
