"""The point-array path of the transform (libs/transformations/points.py): byte-identical to
the general path whenever it is taken, and not taken whenever it could differ."""

import datetime as dt

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely

from libs.geoparquet import to_geoparquet_bytes
from libs.sample_batch import synthetic_points
from libs.transformations import (
    DropEmpty,
    FilterBBox,
    MakeValid,
    PromoteToMulti,
    Rename,
    Reproject,
    transform_chunk_bytes,
)
from libs.transformations import chunk as chunk_module
from libs.transformations import points as points_module
from libs.transformations.recipe import DEFAULT_RECIPE, effective_recipe


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
    """(point path result or None, general path result) for the same input."""
    taken = []

    def spy(*args, **kwargs):
        result = points_module.transform_point_chunk(*args, **kwargs)
        taken.append(result is not None)
        return result

    original = chunk_module.transform_point_chunk
    chunk_module.transform_point_chunk = spy
    try:
        fast = transform_chunk_bytes(data, steps, target, row_offset)
        chunk_module.transform_point_chunk = lambda *a, **k: None
        general = transform_chunk_bytes(data, steps, target, row_offset)
    finally:
        chunk_module.transform_point_chunk = original
    return (fast if taken == [True] else None), general


@pytest.mark.parametrize("steps, target", [
    (effective_recipe(DEFAULT_RECIPE), "EPSG:8857"),  # reproject + make_valid repair
    ([Reproject()], "EPSG:3857"),  # already in the target CRS: nothing moves
    ([Reproject(), MakeValid(policy="fail"), DropEmpty(policy="fail")], "EPSG:4326"),
    ([MakeValid(policy="reject"), Reproject(), DropEmpty(), Reproject()], "EPSG:3395"),
])
def test_point_path_output_is_byte_identical_to_the_general_path(steps, target):
    data = points_chunk()
    fast, general = both_paths(data, steps, target, row_offset=12_345)
    assert fast is not None, "the point path should have been taken"
    assert fast.data == general.data
    assert (fast.rows_in, fast.rows_out, fast.rows_rejected) == (2_000, 2_000, 0)
    assert (fast.bbox, fast.geometry_types, fast.reject_reasons, fast.rejects) == (
        general.bbox, general.geometry_types, general.reject_reasons, general.rejects)


@pytest.mark.parametrize("case", ["null geometry", "empty point", "3D point", "a line",
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
    elif case == "a line":
        geoms[3] = shapely.LineString([(0, 0), (1, 1)])
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
    assert fast is None, f"the point path must not run with {case}"
    assert general.rows_in == 50


def test_point_path_with_no_attributes_and_a_zero_row_offset():
    frame = synthetic_points(10, 1)[["geometry"]]
    fast, general = both_paths(to_geoparquet_bytes(frame), [Reproject()], "EPSG:4326")
    assert fast is not None and fast.data == general.data
