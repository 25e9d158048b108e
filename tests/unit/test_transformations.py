"""The recipe steps against plain geopandas doing the same thing, the per-chunk driver
(rejects, reconciliation, determinism), the up-front plan, and the object-storage task body."""

import datetime as dt
import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely
from geopandas.testing import assert_geodataframe_equal
from pydantic import TypeAdapter, ValidationError

from libs.descriptors import Chunk
from libs.errors import ReconciliationError, TransformError
from libs.geoparquet import to_geoparquet_bytes
from libs.manifest.recipe import (
    ROW_ID,
    Cast,
    Derive,
    DropDuplicates,
    DropEmpty,
    FilterAttribute,
    FilterBBox,
    Force2D,
    MakeValid,
    NormalizeColumnNames,
    PromoteToMulti,
    RecipeStep,
    Rename,
    Reproject,
    Simplify,
)
from libs.object_store import ObjectStoreSettings
from libs.sample_batch import synthetic_points
from libs.transformations import (
    StepResult,
    normalized_names,
    plan_recipe,
    transform_chunk_bytes,
    transform_staged_chunk,
)
from libs.transformations import staged as staged_module
from libs.transformations import steps as steps_module
from libs.transformations.casting import NotConvertible, convert

MERCATOR = "EPSG:3857"
BOWTIE = "POLYGON ((0 0, 1 1, 1 0, 0 1, 0 0))"


# ---------------------------------------------------------------- helpers


def chunk_of(wkts: list[str | None], crs: str = MERCATOR, **columns) -> bytes:
    """A chunk as sharding writes it: GeoParquet of the attributes and the WKT geometries."""
    geometry = gpd.GeoSeries([None if w is None else shapely.from_wkt(w) for w in wkts], crs=crs)
    return to_geoparquet_bytes(gpd.GeoDataFrame(columns, geometry=geometry))


def read(data: bytes) -> gpd.GeoDataFrame:
    """Plain geopandas reading GeoParquet with Arrow-backed columns, covering column dropped."""
    frame = gpd.read_parquet(io.BytesIO(data), to_pandas_kwargs={"types_mapper": pd.ArrowDtype})
    return frame.drop(columns=["bbox"], errors="ignore")


def plain(data: bytes, row_offset: int = 0) -> gpd.GeoDataFrame:
    """The input as plain geopandas sees it, with the ``_row_id`` the transform adds."""
    frame = read(data)
    frame.insert(0, ROW_ID, pd.array(np.arange(row_offset, row_offset + len(frame)),
                                     dtype="int64[pyarrow]"))
    return frame


def run(data: bytes, steps: list, target: str = MERCATOR, row_offset: int = 0):
    """Transform and decode; checks the counts reconcile every time."""
    result = transform_chunk_bytes(data, steps, target, row_offset)
    out = read(result.data)
    rejects = read(result.rejects) if result.rejects is not None else None
    assert result.rows_in == result.rows_out + result.rows_rejected
    assert len(out) == result.rows_out
    assert (0 if rejects is None else len(rejects)) == result.rows_rejected
    assert sum(result.reject_reasons.values()) == result.rows_rejected
    return result, out, rejects


def assert_same(ours: gpd.GeoDataFrame, expected: gpd.GeoDataFrame) -> None:
    """Equal frames and byte-identical geometries (WKB equality also pins the geometry type;
    geopandas' check_geom_type trips over NULL geometries: NaN != NaN)."""
    expected = expected.reset_index(drop=True)
    assert_geodataframe_equal(ours, expected)
    assert ours.geometry.to_wkb().tolist() == expected.geometry.to_wkb().tolist()


def arrow_floats(values) -> pd.arrays.ArrowExtensionArray:
    """A float column as the transform writes it: NaN (geopandas' missing) becomes NULL."""
    return pd.arrays.ArrowExtensionArray(pa.array(np.asarray(values, dtype=float), from_pandas=True))


def repair_invalid(geometry: gpd.GeoSeries) -> gpd.GeoSeries:
    """GEOS make_valid on the invalid geometries only: on a valid polygon it is not the
    identity (the 'structure' method rewrites the ring from another vertex, reversed)."""
    invalid = ~geometry.is_valid & geometry.notna()
    return geometry.where(~invalid, geometry.make_valid(method="structure", keep_collapsed=False))


def as_multi_again(before: gpd.GeoSeries, after: gpd.GeoSeries) -> gpd.GeoSeries:
    """Wrap a single-part result of a Multi* input back into Multi* (what the steps promise)."""
    multi_of = {"MultiPoint": shapely.MultiPoint, "MultiLineString": shapely.MultiLineString,
                "MultiPolygon": shapely.MultiPolygon}

    def wrap(b, a):
        if b is None or a is None or b.geom_type not in multi_of or a.geom_type == b.geom_type:
            return a
        return multi_of[b.geom_type]() if a.is_empty else multi_of[b.geom_type]([a])

    return gpd.GeoSeries([wrap(b, a) for b, a in zip(before, after, strict=True)],
                         index=after.index, crs=after.crs)


def reasons(rejects: gpd.GeoDataFrame) -> dict[int, str]:
    return dict(zip(rejects[ROW_ID].tolist(), rejects["_reject_reason"].tolist(), strict=True))


# ---------------------------------------------------------------- each step vs plain geopandas


def test_reproject_equals_geopandas_and_keeps_row_ids():
    data = to_geoparquet_bytes(synthetic_points(500, seed=7))
    result, out, rejects = run(data, [Reproject()], target="EPSG:8857", row_offset=1000)
    expected = plain(data, row_offset=1000).to_crs("EPSG:8857")
    assert_same(out, expected)
    assert out[ROW_ID].tolist() == list(range(1000, 1500))
    assert rejects is None and result.reject_reasons == {}
    assert result.bbox == pytest.approx(tuple(expected.total_bounds))
    assert result.geometry_types == ["Point"]


def test_reproject_rejects_rows_outside_the_target_area_of_use():
    ortho = "+proj=ortho +lat_0=0 +lon_0=0 +datum=WGS84 +units=m +no_defs"
    data = chunk_of(["POINT (10 10)", "POINT (170 0)"], crs="EPSG:4326", name=["near", "far"])
    result, out, rejects = run(data, [Reproject()], target=ortho)
    assert out["name"].tolist() == ["near"]
    assert rejects["_reject_step"].tolist() == ["reproject"]
    assert "coordinates are not finite" in rejects["_reject_reason"].iloc[0]
    assert rejects.geometry.iloc[0].equals(shapely.Point(170, 0)) and rejects.crs == "EPSG:4326"


def test_make_valid_repair_equals_geopandas_structure_method():
    spike = "POLYGON ((0 0, 10 0, 10 10, 0 10, 0 0, -5 -5, 0 0))"
    data = chunk_of([BOWTIE, "POLYGON ((0 0, 1 0, 1 1, 0 1, 0 0))", None, spike], a=[1, 2, 3, 4])
    _, out, rejects = run(data, [MakeValid(policy="repair")])
    expected = plain(data)
    expected = expected.set_geometry(repair_invalid(expected.geometry))
    assert_same(out, expected)
    assert rejects is None
    assert out.geometry.iloc[0].area == pytest.approx(0.5)  # the two triangles of the bowtie
    # structure/keep_collapsed=False keeps a polygon polygonal; 'linework' would give a
    # GEOMETRYCOLLECTION of the square and the spike's line
    assert out.geometry.iloc[3].geom_type == "Polygon"


def test_make_valid_reject_keeps_the_row_with_the_geos_reason():
    data = chunk_of([BOWTIE, "POINT (1 1)"], name=["bow", "ok"])
    result, out, rejects = run(data, [MakeValid(policy="reject")], row_offset=40)
    assert_same(out, plain(data, row_offset=40).iloc[[1]])
    assert reasons(rejects) == {40: "make_valid: invalid geometry (Self-intersection[0.5 0.5])"}
    assert rejects["_reject_step"].tolist() == ["make_valid"]
    assert json.loads(rejects["_attributes"].iloc[0]) == {"name": "bow"}
    assert rejects.geometry.iloc[0].wkt == BOWTIE
    assert result.reject_reasons == {"make_valid": 1}


def test_make_valid_fail_names_step_row_and_reason():
    data = chunk_of(["POINT (1 1)", BOWTIE])
    with pytest.raises(TransformError, match=r"recipe step 1: make_valid failed on _row_id 11: "
                                             r"invalid geometry \(Self-intersection\[0.5 0.5\]\)"):
        transform_chunk_bytes(data, [Reproject(), MakeValid(policy="fail")], MERCATOR, 10)


def test_drop_empty_rejects_null_and_empty_geometries():
    data = chunk_of(["POINT (1 1)", None, "POINT EMPTY", "LINESTRING (0 0, 1 1)"], a=[1, 2, 3, 4])
    _, out, rejects = run(data, [DropEmpty(policy="reject")])
    expected = plain(data)
    assert_same(out, expected[~(expected.geometry.isna() | expected.geometry.is_empty)])
    assert reasons(rejects) == {1: "drop_empty: geometry is NULL",
                                2: "drop_empty: geometry is empty"}
    assert rejects.geometry.isna().tolist() == [True, False]
    with pytest.raises(TransformError, match="drop_empty failed on _row_id 1: geometry is NULL"):
        transform_chunk_bytes(data, [DropEmpty(policy="fail")], MERCATOR, 0)


def test_promote_to_multi_equals_wrapping_in_multi_types():
    data = chunk_of(["POINT (1 2)", "MULTIPOINT ((1 2), (3 4))", "LINESTRING Z (0 0 1, 1 1 2)",
                     "POLYGON ((0 0, 1 0, 1 1, 0 0))", "POLYGON EMPTY", None])
    result, out, _ = run(data, [PromoteToMulti()])
    multi_of = {"Point": shapely.MultiPoint, "LineString": shapely.MultiLineString,
                "Polygon": shapely.MultiPolygon}

    def promote(geom):
        if geom is None or geom.geom_type not in multi_of:
            return geom
        return multi_of[geom.geom_type]() if geom.is_empty else multi_of[geom.geom_type]([geom])

    expected = plain(data)
    expected = expected.set_geometry(expected.geometry.apply(promote))
    assert_same(out, expected)
    assert result.geometry_types == ["MultiLineString Z", "MultiPoint", "MultiPolygon"]


def test_simplify_equals_geopandas_preserving_topology():
    wiggle = "LINESTRING (0 0, 1 0.05, 2 -0.05, 3 0.05, 4 0, 5 3)"
    ring = "POLYGON ((0 0, 5 0.1, 10 0, 10 10, 5 10.1, 0 10, 0 0), (4 4, 6 4, 6 6, 4 6, 4 4))"
    data = chunk_of([wiggle, ring, None, f"MULTI{wiggle.replace('(', '((')})",
                     "MULTIPOLYGON (((0 0, 5 0.1, 10 0, 10 10, 0 0)))"])
    result, out, _ = run(data, [Simplify(tolerance=0.5)])
    expected = plain(data)
    simplified = expected.geometry.simplify(0.5, preserve_topology=True)
    expected = expected.set_geometry(as_multi_again(expected.geometry, simplified))
    assert_same(out, expected)
    assert len(out.geometry.iloc[0].coords) == 3
    # GEOS returns a LineString/Polygon for a one-part Multi*; the step keeps the type
    assert out.geometry.iloc[3].geom_type == "MultiLineString"
    assert out.geometry.iloc[4].geom_type == "MultiPolygon"


def test_filter_bbox_in_the_chunk_crs_equals_intersects():
    data = chunk_of(["POINT (5 5)", "POLYGON ((8 8, 20 8, 20 20, 8 20, 8 8))", "POINT (50 50)",
                     None, "POINT EMPTY"])
    _, out, rejects = run(data, [FilterBBox(bbox=(0, 0, 10, 10))])
    expected = plain(data)
    assert_same(out, expected[expected.intersects(shapely.box(0, 0, 10, 10))])
    assert reasons(rejects) == {
        2: "filter_bbox: geometry does not intersect bbox [0.0, 0.0, 10.0, 10.0] (EPSG:3857)",
        3: "filter_bbox: geometry is NULL",
        4: "filter_bbox: geometry is empty",
    }


def test_filter_bbox_in_another_crs_equals_filtering_in_that_crs():
    data = to_geoparquet_bytes(synthetic_points(400, seed=3))
    europe = (-10.0, 35.0, 30.0, 60.0)
    result, out, _ = run(data, [FilterBBox(bbox=europe, crs="EPSG:4326")])
    expected = plain(data)
    assert_same(out, expected[expected.to_crs("EPSG:4326").intersects(shapely.box(*europe))])
    assert 0 < result.rows_out < 400


@pytest.fixture
def populated() -> bytes:
    pop = pd.array([5, None, 1500, 1000], dtype="int64[pyarrow]")
    return chunk_of(["POINT (0 0)"] * 4, pop=pop, kind=["a", "b", None, "c"],
                    since=pd.array([dt.date(2020, 1, 1), dt.date(2021, 6, 1), None,
                                    dt.date(2022, 1, 1)], dtype=pd.ArrowDtype(pa.date32())))


@pytest.mark.parametrize(("column", "op", "value", "kept"), [
    ("pop", ">=", 1000, [2, 3]),
    ("pop", "<", 1000, [0]),
    ("pop", "==", 1000.0, [3]),
    ("pop", "!=", 5, [2, 3]),  # NULL != 5 is not true
    ("pop", "in", [5, 1000], [0, 3]),
    ("pop", "not_in", [5], [2, 3]),  # nor is NULL not in [5]
    ("pop", "is_null", None, [1]),
    ("pop", "not_null", None, [0, 2, 3]),
    ("kind", "in", ["a", "c"], [0, 3]),
    ("since", ">=", "2021-01-01", [1, 3]),
])
def test_filter_equals_selecting_with_null_never_matching(populated, column, op, value, kept):
    _, out, rejects = run(populated, [FilterAttribute(column=column, op=op, value=value)])
    assert_same(out, plain(populated).iloc[kept])
    assert sorted(rejects[ROW_ID].tolist()) == sorted(set(range(4)) - set(kept))
    assert set(rejects["_reject_step"]) == {"filter"}


def test_filter_reasons_quote_the_predicate(populated):
    _, _, rejects = run(populated, [FilterAttribute(column="pop", op=">=", value=1000)])
    assert reasons(rejects) == {0: "filter: pop >= 1000 is false",
                                1: "filter: pop >= 1000 is false (pop is NULL)"}


def test_derive_measures_in_the_stated_crs_like_geopandas():
    one_degree = ["POLYGON ((10 0, 11 0, 11 1, 10 1, 10 0))",
                  "POLYGON ((10 60, 11 60, 11 61, 10 61, 10 60))", None]
    data = chunk_of(one_degree, crs="EPSG:4326", name=["equator", "north", "none"])
    steps = [Reproject(), Derive(column="area", kind="area", crs="EPSG:6933"),
             Derive(column="perimeter", kind="length", crs="EPSG:6933"),
             Derive(column="x", kind="centroid_x"), Derive(column="lat", kind="centroid_y",
                                                            crs="EPSG:4326")]
    _, out, _ = run(data, steps)
    expected = plain(data).to_crs(MERCATOR)
    equal_area = expected.to_crs("EPSG:6933")
    expected["area"] = arrow_floats(equal_area.area)
    expected["perimeter"] = arrow_floats(equal_area.length)
    expected["x"] = arrow_floats(expected.centroid.x)
    with pytest.warns(UserWarning, match="geographic CRS"):  # geopandas warns, we measure anyway
        expected["lat"] = arrow_floats(expected.to_crs("EPSG:4326").centroid.y)
    expected = expected[[ROW_ID, "name", "area", "perimeter", "x", "lat", "geometry"]]
    assert_same(out, expected)
    assert out["area"].iloc[0] == pytest.approx(1.23e10, rel=0.01)  # ~111 km x 111 km
    assert out["area"].iloc[1] == pytest.approx(out["area"].iloc[0] / 2, rel=0.01)
    assert out["area"].isna().tolist() == [False, False, True]


def test_rename_then_cast_rejects_values_that_do_not_convert():
    pop = ["10", " 20 ", "abc", "", "3.5", None]
    data = chunk_of(["POINT (0 0)"] * 6, name=list("abcdef"), pop=pop)
    result, out, rejects = run(data, [Rename(columns={"pop": "population"}),
                                      Cast(columns={"population": "int64", "name": "string"})])
    expected = plain(data).rename(columns={"pop": "population"}).iloc[[0, 1, 3, 5]]
    expected["name"] = pd.array(["a", "b", "d", "f"], dtype=pd.ArrowDtype(pa.string()))
    expected["population"] = pd.array([10, 20, None, None], dtype="int64[pyarrow]")
    assert_same(out, expected)
    assert reasons(rejects) == {2: "cast: 'abc' is not int64 in column population",
                                4: "cast: '3.5' is not int64 in column population"}
    assert json.loads(rejects["_attributes"].iloc[0]) == {"name": "c", "population": "abc"}
    assert result.reject_reasons == {"cast": 2}


@pytest.mark.parametrize(("value", "target", "expected"), [
    ("-12", "int64", -12), (3.0, "int64", 3), (True, "int64", 1), ("  ", "int64", None),
    (float("nan"), "int64", None), ("2e3", "float64", 2000.0), (7, "float64", 7.0),
    (1.5, "string", "1.5"), (False, "string", "false"), (dt.date(2020, 1, 2), "string", "2020-01-02"),
    ("Yes", "bool", True), (0, "bool", False), ("2020-01-31", "date", dt.date(2020, 1, 31)),
    (dt.datetime(2020, 1, 31), "date", dt.date(2020, 1, 31)),
    ("2020-01-31T12:00:00+02:00", "timestamp", dt.datetime(2020, 1, 31, 10, tzinfo=dt.UTC)),
    ("2020-01-31 12:00", "timestamp", dt.datetime(2020, 1, 31, 12, tzinfo=dt.UTC)),
])
def test_cast_conversions(value, target, expected):
    assert convert(value, target) == expected


@pytest.mark.parametrize(("value", "target"), [
    ("3.5", "int64"), (3.5, "int64"), ("1e3", "int64"), (2**63, "int64"), ("abc", "float64"),
    ("maybe", "bool"), (2, "bool"), ("31/01/2020", "date"), (dt.datetime(2020, 1, 31, 1), "date"),
    ("noon", "timestamp"), ([1], "string"),
])
def test_cast_refuses_lossy_or_unreadable_values(value, target):
    with pytest.raises(NotConvertible):
        convert(value, target)


def test_normalize_column_names_is_safe_and_deterministic():
    names = ["Name", "name", "Pop. 2020", "2020", "Geometry", "a" * 70, "a" * 70 + "b", "name_2", ""]
    expected = ["name", "name_3", "pop__2020", "_2020", "geometry_2", "a" * 63, "a" * 61 + "_2",
                "name_2", "_"]
    assert normalized_names(names) == expected
    data = chunk_of(["POINT (0 0)"], **{n: [i] for i, n in enumerate(names)})
    _, out, _ = run(data, [NormalizeColumnNames()])
    assert out.columns.tolist() == [ROW_ID, *expected, "geometry"]
    assert out.iloc[0, 1:-1].tolist() == list(range(len(names)))
    assert all(re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", n) for n in expected)


def test_drop_duplicates_equals_geopandas_on_attributes_and_wkb():
    wkts = ["POINT (0 0)", "POINT (0 0)", "POINT (1 1)", "POINT (0 0)", "POINT (0 0)", None, None]
    data = chunk_of(wkts, name=["a", "a", "a", "b", "a", None, None], v=[1.0, 1.0, 1.0, 1.0, 1.0,
                                                                          np.nan, np.nan])
    _, out, rejects = run(data, [DropDuplicates()], row_offset=100)
    expected = plain(data, row_offset=100)
    keys = expected.drop(columns=[ROW_ID, "geometry"]).assign(wkb=expected.geometry.to_wkb())
    assert_same(out, expected[~keys.duplicated(keep="first")])
    assert reasons(rejects) == {101: "drop_duplicates: duplicate of _row_id 100",
                                104: "drop_duplicates: duplicate of _row_id 100",
                                106: "drop_duplicates: duplicate of _row_id 105"}


# ---------------------------------------------------------------- a whole recipe


@pytest.fixture
def parcels() -> bytes:
    """Boxes in EPSG:4326: a bowtie, a NULL, a duplicate, an unreadable and a small population,
    one box outside the bbox."""
    boxes = [shapely.box(x, 45, x + 0.5, 45.5).wkt for x in range(6)]
    bowtie = "POLYGON ((2 45, 3 46, 3 45, 2 46, 2 45))"
    wkts = [boxes[0], bowtie, None, boxes[3], boxes[3], boxes[4], boxes[5],
            shapely.box(40, 45, 41, 46).wkt]
    return chunk_of(wkts, crs="EPSG:4326", **{
        "Parcel Name": ["p0", "p1", "p2", "p3", "p3", "p4", "p5", "far"],
        "Pop": ["150", "200", "300", "400", "400", "abc", "50", "500"],
    })


RECIPE = [
    Reproject(), MakeValid(policy="repair"), DropEmpty(policy="reject"), PromoteToMulti(),
    Simplify(tolerance=100.0), FilterBBox(bbox=(-1.0, 44.0, 10.0, 47.0), crs="EPSG:4326"),
    NormalizeColumnNames(), Cast(columns={"pop": "int64"}),
    FilterAttribute(column="pop", op=">=", value=100), Derive(column="area", kind="area",
                                                             crs="EPSG:6933"),
    Rename(columns={"parcel_name": "label"}), DropDuplicates(),
]


def test_recipe_equals_plain_geopandas_step_by_step(parcels):
    result, out, rejects = run(parcels, RECIPE, row_offset=7)
    g = plain(parcels, row_offset=7).to_crs(MERCATOR)
    g = g.set_geometry(repair_invalid(g.geometry))
    g = g[~(g.geometry.isna() | g.geometry.is_empty)]
    g = g.set_geometry(g.geometry.apply(
        lambda p: shapely.MultiPolygon([p]) if p.geom_type == "Polygon" else p))
    g = g.set_geometry(as_multi_again(g.geometry, g.geometry.simplify(100.0, preserve_topology=True)))
    g = g[g.to_crs("EPSG:4326").intersects(shapely.box(-1, 44, 10, 47))]
    g = g.rename(columns={"Parcel Name": "parcel_name", "Pop": "pop"})
    g = g[g["pop"].str.fullmatch(r"\d+").astype(bool)]
    g["pop"] = g["pop"].astype("int64[pyarrow]")
    g = g[g["pop"] >= 100]
    g["area"] = arrow_floats(g.to_crs("EPSG:6933").area)
    g = g.rename(columns={"parcel_name": "label"})
    keys = g.drop(columns=[ROW_ID, "geometry"]).assign(wkb=g.geometry.to_wkb())
    g = g[~keys.duplicated()]
    assert_same(out, g[[ROW_ID, "label", "pop", "area", "geometry"]])
    assert out["label"].tolist() == ["p0", "p1", "p3"]
    assert reasons(rejects) == {
        9: "drop_empty: geometry is NULL",
        11: "drop_duplicates: duplicate of _row_id 10",
        12: "cast: 'abc' is not int64 in column pop",
        13: "filter: pop >= 100 is false",
        14: "filter_bbox: geometry does not intersect bbox [-1.0, 44.0, 10.0, 47.0] (EPSG:4326)",
    }
    assert result.reject_reasons == {"drop_empty": 1, "filter_bbox": 1, "cast": 1, "filter": 1,
                                     "drop_duplicates": 1}
    assert result.geometry_types == ["MultiPolygon"]
    # the attributes as they were when the row was rejected; the geometry as it came in
    attributes = dict(zip(rejects[ROW_ID], rejects["_attributes"].map(json.loads), strict=True))
    assert attributes[12] == {"parcel_name": "p4", "pop": "abc"}
    assert attributes[14] == {"Parcel Name": "far", "Pop": "500"}
    assert attributes[11] == {"label": "p3", "pop": 400, "area": pytest.approx(out["area"].iloc[2])}
    assert rejects.crs == "EPSG:4326"
    assert rejects.geometry.iloc[4].equals(shapely.box(40, 45, 41, 46))


def test_plan_predicts_the_output_schema(parcels):
    planned = plan_recipe(RECIPE, pq.read_schema(io.BytesIO(parcels)), MERCATOR)
    assert planned.names == [ROW_ID, "label", "pop", "area", "geometry"]
    written = pq.read_schema(io.BytesIO(transform_chunk_bytes(parcels, RECIPE, MERCATOR, 0).data))
    assert [(f.name, f.type) for f in written if f.name != "bbox"] == \
        [(f.name, f.type) for f in planned]


def test_output_and_rejects_are_byte_identical_across_runs_and_processes(parcels):
    first = transform_chunk_bytes(parcels, RECIPE, MERCATOR, 7)
    again = transform_chunk_bytes(parcels, RECIPE, MERCATOR, 7)
    assert (first.data, first.rejects) == (again.data, again.rejects)
    footer = pq.read_metadata(io.BytesIO(first.data)).metadata
    assert set(footer) <= {b"pandas", b"geo", b"ARROW:schema"}
    assert not any(re.search(rb"\d{4}-\d\d-\d\dT\d\d:", value) for value in footer.values())
    script = (
        "import sys, hashlib\n"
        "from tests.unit.test_transformations import RECIPE, MERCATOR, transform_chunk_bytes\n"
        "r = transform_chunk_bytes(sys.stdin.buffer.read(), RECIPE, MERCATOR, 7)\n"
        "print(hashlib.sha256(r.data + r.rejects).hexdigest())\n"
    )
    other = subprocess.run([sys.executable, "-c", script], input=parcels, capture_output=True,
                           check=True, cwd=Path(__file__).parents[2])
    assert other.stdout.decode().strip() == hashlib.sha256(first.data + first.rejects).hexdigest()


def test_rows_that_vanish_fail_reconciliation(parcels, monkeypatch):
    def leaky(frame, step, target_crs):  # drops a row without rejecting it
        return StepResult(frame.iloc[1:], frame.iloc[:0])

    monkeypatch.setitem(steps_module.STEP_FUNCTIONS, DropEmpty, leaky)
    with pytest.raises(ReconciliationError, match="8 rows in, 7 out, 0 rejected"):
        transform_chunk_bytes(parcels, [DropEmpty()], MERCATOR, 0)


# ---------------------------------------------------------------- validation up front


def schema_of(**types) -> pa.Schema:
    return pa.schema([*(pa.field(n, t) for n, t in types.items()), pa.field("geometry", pa.binary())])


@pytest.mark.parametrize(("steps", "message"), [
    ([FilterAttribute(column="pop", op=">", value=1)],
     r"recipe step 1 \(filter\): column 'pop' does not exist; available columns: \['name', 'n', 'tags'\]"),
    ([Rename(columns={"name": "label"}), FilterAttribute(column="name", op="is_null")],
     r"recipe step 2 \(filter\): column 'name' does not exist; available columns: \['label', 'n', 'tags'\]"),
    ([FilterAttribute(column="name", op=">", value=3)],
     r"name > 3: column 'name' is string: expected a string, not 3"),
    ([Rename(columns={"name": "n"})], r"step 1 \(rename\): renaming 'name' to 'n' clashes"),
    ([Derive(column="n", kind="area", crs="EPSG:6933")], r"derived column 'n' already exists"),
    ([Derive(column="a", kind="area", crs="EPSG:4326")], r"square degrees"),
    ([Cast(columns={"tags": "string"})], r"column 'tags' is list<item: string>"),
    ([Simplify(tolerance=1), Reproject()], r"step 0 \(simplify\).*place reproject before"),
])
def test_plan_names_the_step_and_the_columns(steps, message):
    schema = schema_of(name=pa.string(), n=pa.int64(), tags=pa.list_(pa.string()))
    with pytest.raises(TransformError, match=message):
        plan_recipe(steps, schema, MERCATOR)


def test_plan_ignores_the_geometry_and_covering_columns_of_any_schema():
    wkb = pa.field("wkb_geometry", pa.binary(), metadata={"ARROW:extension:name": "geoarrow.wkb"})
    gdal = pa.schema([pa.field("Name", pa.string()), wkb])
    assert plan_recipe([NormalizeColumnNames()], gdal, MERCATOR).names == [ROW_ID, "name", "geometry"]
    bbox = pa.struct([(k, pa.float64()) for k in ("xmin", "ymin", "xmax", "ymax")])
    covered = schema_of(a=pa.int64(), bbox=bbox)
    assert plan_recipe([], covered, MERCATOR).names == [ROW_ID, "a", "geometry"]


def test_plan_refuses_a_source_column_named_row_id():
    with pytest.raises(TransformError, match="column named '_row_id'.*rename or drop it"):
        plan_recipe([], schema_of(_row_id=pa.int64()), MERCATOR)


@pytest.mark.parametrize("step", [
    {"step": "filter", "column": "_row_id", "op": "is_null"},
    {"step": "rename", "columns": {"_row_id": "rid"}},
    {"step": "rename", "columns": {"a": "_row_id"}},
    {"step": "rename", "columns": {"a": "x", "b": "x"}},
    {"step": "cast", "columns": {"_row_id": "string"}},
    {"step": "derive", "column": "geometry", "kind": "area"},
    {"step": "derive", "column": "a", "kind": "area", "crs": "EPSG:999999"},
])
def test_recipe_models_refuse_reserved_names_and_unknown_crs(step):
    with pytest.raises(ValidationError):
        TypeAdapter(RecipeStep).validate_python(step)


# ---------------------------------------------------------------- the task body


class MemoryStore:
    objects: dict[tuple[str, str], bytes] = {}

    def __init__(self, settings):
        self.settings = settings

    def get_bytes(self, bucket, key):
        return self.objects[(bucket, key)]

    def put_bytes(self, bucket, key, data, content_type):
        self.objects[(bucket, key)] = data
        return hashlib.sha256(data).hexdigest()


@pytest.fixture
def memory_store(monkeypatch):
    monkeypatch.setattr(MemoryStore, "objects", {})
    monkeypatch.setattr(staged_module, "ObjectStore", MemoryStore)
    return MemoryStore.objects


def staged_chunk(store: dict, data: bytes) -> Chunk:
    store[("staging", "in/chunk-00003.parquet")] = data
    return Chunk(key="in/chunk-00003.parquet", layer="parcels", ordinal=3, row_offset=7,
                 rows=8, bbox=None, crs="EPSG:4326", bytes=len(data),
                 sha256=hashlib.sha256(data).hexdigest())


SETTINGS = ObjectStoreSettings(endpoint="127.0.0.1:9000", access_key="k", secret_key="s")


def test_staged_chunk_writes_output_and_rejects(memory_store, parcels):
    chunk = staged_chunk(memory_store, parcels)
    done = transform_staged_chunk(SETTINGS, "staging", chunk, "out/c3.parquet", "rej/c3.parquet",
                                  RECIPE, MERCATOR)
    assert (done.rows_in, done.chunk.rows, done.rejects.rows) == (8, 3, 5)
    assert done.chunk.crs == MERCATOR and done.rejects.crs == "EPSG:4326"
    for written in (done.chunk, done.rejects):
        data = memory_store[("staging", written.key)]
        assert written.sha256 == hashlib.sha256(data).hexdigest() and written.bytes == len(data)
        assert (written.ordinal, written.row_offset, written.layer) == (3, 7, "parcels")
    assert done.reject_reasons["cast"] == 1
    assert done.chunk.bbox == pytest.approx(tuple(read(memory_store[("staging", done.chunk.key)])
                                                  .total_bounds))


def test_staged_chunk_without_rejects_writes_no_rejects_object(memory_store):
    chunk = staged_chunk(memory_store, chunk_of(["POINT (1 1)"] * 8, crs="EPSG:4326"))
    done = transform_staged_chunk(SETTINGS, "staging", chunk, "out/c3.parquet", "rej/c3.parquet",
                                  [Reproject()], MERCATOR)
    assert done.rejects is None and done.reject_reasons == {}
    assert ("staging", "rej/c3.parquet") not in memory_store


def test_staged_chunk_errors_name_layer_and_chunk(memory_store, parcels):
    chunk = staged_chunk(memory_store, parcels)
    with pytest.raises(TransformError, match=r"layer 'parcels', chunk 3 \(in/chunk-00003.parquet\): "
                                             r"recipe step 1: drop_empty failed on _row_id 9"):
        transform_staged_chunk(SETTINGS, "staging", chunk, "o", "r",
                               [Reproject(), DropEmpty(policy="fail")], MERCATOR)
    memory_store[("staging", chunk.key)] = parcels + b"tampered"
    with pytest.raises(TransformError, match="sha256 is not the one sharding recorded"):
        transform_staged_chunk(SETTINGS, "staging", chunk, "o", "r", RECIPE, MERCATOR)


# ---------------------------------------------------------------- Z and M (issue 27)

THREE_D = ["POINT Z (1000 2000 5)", "LINESTRING Z (0 0 1, 1000 1000 2)",
           "POLYGON Z ((0 0 3, 10 0 3, 10 10 4, 0 0 3))", None]


def test_reprojection_keeps_z_unchanged_and_reports_z_types():
    result, out, _ = run(chunk_of(THREE_D, n=[1, 2, 3, 4]), [Reproject()], "EPSG:4326")
    geoms = out.geometry.values
    assert shapely.has_z(geoms[:3]).all()
    np.testing.assert_array_equal(shapely.get_coordinates(geoms, include_z=True)[:, 2],
                                  [5, 1, 2, 3, 3, 4, 3])
    assert result.geometry_types == ["LineString Z", "Point Z", "Polygon Z"]


def test_force_2d_drops_z_and_m_and_keeps_2d_rows_and_nulls():
    data = chunk_of([*THREE_D, "POINT (7 8)"], n=[1, 2, 3, 4, 5])
    result, out, _ = run(data, [Force2D(), Reproject()], MERCATOR)
    assert not shapely.has_z(out.geometry.values).any()
    assert out.geometry.values[3] is None
    assert [g.wkt for g in out.geometry.values[[0, 4]]] == ["POINT (1000 2000)", "POINT (7 8)"]
    assert result.geometry_types == ["LineString", "Point", "Polygon"]
    m_data = chunk_of(["POINT (1 2)"], n=[1])
    frame = read(m_data)
    for wkt in ("POINT ZM (1 2 3 4)", "POINT M (1 2 4)"):
        frame = frame.set_geometry(gpd.GeoSeries([shapely.from_wkt(wkt)], crs=MERCATOR))
        _, out, _ = run(to_geoparquet_bytes(frame), [Force2D(), Reproject()], "EPSG:4326")
        assert not shapely.has_m(out.geometry.values).any(), wkt


def test_m_values_are_kept_in_place_and_refused_by_a_reprojection():
    """M is kept where nothing moves coordinates (types say " M", the GeoParquet metadata,
    which has no M, the type without it); a reprojection fails naming the row and force_2d."""
    frame = read(chunk_of(["POINT (1 2)", "POINT (3 4)"], n=[1, 2]))
    frame = frame.set_geometry(gpd.GeoSeries(
        [shapely.Point(1, 2), shapely.from_wkt("LINESTRING ZM (0 0 1 7, 1 1 2 8)")], crs=MERCATOR))
    data = to_geoparquet_bytes(frame)
    result, out, _ = run(data, [Reproject(), MakeValid()], MERCATOR)
    assert out.geometry.values[1].wkt == "LINESTRING ZM (0 0 1 7, 1 1 2 8)"
    assert result.geometry_types == ["LineString ZM", "Point"]
    geo = json.loads(pq.read_schema(io.BytesIO(result.data)).metadata[b"geo"])
    assert geo["columns"]["geometry"]["geometry_types"] == ["LineString Z", "Point"]
    with pytest.raises(TransformError, match=r"1 of 2 geometries carry M .* _row_id 11.*"
                                             r"'force_2d'"):
        transform_chunk_bytes(data, [Reproject()], "EPSG:4326", 10)
