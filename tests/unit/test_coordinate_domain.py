"""Coordinate domain checks (libs/transformations/domain.py and the reproject step): the array
functions, then whole chunks through ``transform_chunk_bytes`` on both transform paths."""

import io
import json

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
from pyproj import CRS

from libs.errors import TransformError
from libs.geoparquet import to_geoparquet_bytes
from libs.manifest.recipe import MakeValid, Reproject
from libs.transformations import arrays as arrays_module
from libs.transformations import domain, transform_chunk_bytes
from libs.transformations.chunk import read_chunk


def chunk(geoms, crs="EPSG:4326") -> bytes:
    frame = gpd.GeoDataFrame({"name": [f"g{i}" for i in range(len(geoms))]},
                             geometry=list(geoms), crs=crs)
    return to_geoparquet_bytes(frame)


def rejects_of(result) -> gpd.GeoDataFrame:
    return gpd.read_parquet(io.BytesIO(result.rejects))


# ---------------------------------------------------------------- array functions


def test_geographic_domain_is_plus_minus_90_and_180_with_the_antimeridian_tolerance():
    box = domain.domain_of(CRS("EPSG:4326"))
    x = np.array([0.0, 181.0, 360.0, 360.5, 10.0, 10.0, np.nan, np.inf])
    y = np.array([0.0, 10.0, -90.0, 0.0, 90.5, -120.0, 0.0, 0.0])
    assert box.outside(x, y).tolist() == [False, False, False, True, True, True, True, True]
    assert not box.holds(x, y) and box.holds(x[:3], y[:3]) and box.holds(x[:0], y[:0])


def test_projected_domain_is_the_area_of_use_with_a_margin():
    mercator = domain.domain_of(CRS("EPSG:3857"))
    world = 20037508.342789244
    # the whole map, but not 90 degrees north projected (2.4e8 m), nor 1e300
    assert mercator.holds(np.array([-world, world]), np.array([-world, world]))
    assert mercator.outside(np.array([0.0, 1e300]), np.array([2.38e8, 0.0])).all()
    utm = domain.domain_of(CRS("EPSG:25833"))  # UTM 33N: official zone 12-18 E
    x, y = CRS_points("EPSG:25833", [4.5, 31.0, 15.0], [61.0, 70.0, -60.0])
    # Norway's west coast and its far north-east are inside; the southern ocean is not
    assert utm.outside(x, y).tolist() == [False, False, True]
    assert domain.domain_of(CRS("EPSG:3857")) is mercator  # cached per CRS


def CRS_points(crs: str, lon: list[float], lat: list[float]):
    from pyproj import Transformer

    return Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(
        np.array(lon), np.array(lat))


def test_first_outside_names_each_geometry_once_with_its_first_offending_coordinate():
    box = domain.domain_of(CRS("EPSG:4326"))
    x = np.array([0.0, 1.0, 2.0, 500.0, 3.0, 600.0])
    y = np.array([0.0, 95.0, 99.0, 0.0, 0.0, 0.0])
    index = np.array([0, 1, 1, 2, 3, 3])
    bad, first = domain.first_outside(x, y, index, 5, box)
    assert bad.tolist() == [False, True, True, True, False]
    assert first.tolist() == [1, 3, 5]


def test_outside_rows_from_bounds():
    box = domain.domain_of(CRS("EPSG:4326"))
    bounds = np.array([[0, 0, 1, 1], [0, 0, 1, 91], [-361, 0, 0, 0], [np.nan] * 4], dtype=float)
    assert domain.outside_rows(bounds, box).tolist() == [False, True, True, True]


def test_swapped_only_when_most_are_outside_well_beyond_and_all_of_them_fit_exchanged():
    box = domain.domain_of(CRS("EPSG:4326"))
    # the coordinates of the geometries outside (0..k-1) and how many geometries there are
    assert domain.swapped(np.array([45.0, 50.0]), np.array([120.0, 130.0]), np.arange(2), 3, box)
    assert not domain.swapped(np.array([45.0]), np.array([120.0]), np.arange(1), 3, box)
    assert not domain.swapped(np.array([45.0, 500.0]), np.array([120.0, 130.0]), np.arange(2),
                              3, box)  # 500 fits neither way
    assert not domain.swapped(np.array([45.0, 50.0]), np.array([90.001, 90.2]), np.arange(2),
                              3, box)  # polar data a rounding error beyond the pole


def test_clipped_moves_coordinates_onto_the_edge_and_keeps_z():
    box = domain.domain_of(CRS("EPSG:4326"))
    out = domain.clipped(np.array([shapely.Point(10, 91, 5), shapely.LineString(
        [(0, -95), (1, 1)])]), box)
    assert out[0].equals_exact(shapely.Point(10, 90, 5), 0) and out[0].has_z
    assert shapely.get_coordinates(out[1]).tolist() == [[0, -90], [1, 1]]


# ---------------------------------------------------------------- whole chunks


def test_out_of_domain_geographic_source_rows_are_rejected_with_the_offending_value():
    geoms = [shapely.Point(10, 50), shapely.Point(10, 120), shapely.Point(1e300, 0),
             shapely.LineString([(0, 0), (1, 200)]), shapely.Point(-179, -89)]
    result = transform_chunk_bytes(chunk(geoms), [Reproject()], "EPSG:4326", 100)
    assert (result.rows_out, result.rows_rejected) == (2, 3)
    rejects = rejects_of(result)
    assert rejects["_row_id"].tolist() == [101, 102, 103]
    assert rejects["_reject_step"].eq("reproject").all()
    reasons = rejects["_reject_reason"].tolist()
    assert "(10.0, 120.0)" in reasons[0] and "outside the source CRS 'WGS 84'" in reasons[0]
    assert "1e+300" in reasons[1] and "(1.0, 200.0)" in reasons[2]
    assert "latitude within ±90" in reasons[0]
    assert json.loads(rejects["_attributes"][0]) == {"name": "g1"}
    assert result.bbox == (-179.0, -89.0, 10.0, 50.0)  # finite: the rejects never reach it
    covering = pq.read_table(io.BytesIO(result.rejects)).column("bbox").combine_chunks()
    assert all(np.isfinite(covering.field(f).to_numpy()).all() for f in ("xmin", "xmax"))


def test_out_of_target_domain_rows_are_rejected_after_reprojection():
    geoms = [shapely.Point(10, 50), shapely.Point(0, 90), shapely.Point(0, 89.9999)]
    result = transform_chunk_bytes(chunk(geoms), [Reproject()], "EPSG:3857", 0)
    assert result.rows_out == 1
    reasons = rejects_of(result)["_reject_reason"].tolist()
    assert all("outside the target CRS 'WGS 84 / Pseudo-Mercator'" in r for r in reasons)
    assert all(np.isfinite(result.bbox))


def test_projected_source_out_of_its_area_is_rejected_before_reprojection():
    x, y = CRS_points("EPSG:25833", [15.0], [60.0])
    geoms = [shapely.Point(x[0], y[0]), shapely.Point(1e12, 6e6)]
    result = transform_chunk_bytes(chunk(geoms, "EPSG:25833"), [Reproject()], "EPSG:4326", 0)
    assert result.rows_out == 1
    reason = rejects_of(result)["_reject_reason"][0]
    assert "outside the source CRS 'ETRS89 / UTM zone 33N'" in reason and "1000000000000.0" in reason


def test_policy_fail_fails_the_chunk_naming_the_row_and_value():
    geoms = [shapely.Point(10, 50), shapely.Point(10, 95)]
    with pytest.raises(TransformError, match=r"reproject failed on _row_id 8.*\(10\.0, 95\.0\)"):
        transform_chunk_bytes(chunk(geoms), [Reproject(policy="fail")], "EPSG:3857", 7)


def test_swapped_axes_fail_with_a_question():
    # Sydney, Tokyo, Honolulu as (lat, lon): latitudes over 90; Berlin's swap goes unseen
    geoms = [shapely.Point(-33.9, 151.2), shapely.Point(35.7, 139.7), shapely.Point(21.3, -157.8),
             shapely.Point(52.5, 13.4)]
    with pytest.raises(TransformError, match=r"3 of 4 geometries.*did you swap x and y\?"):
        transform_chunk_bytes(chunk(geoms), [Reproject()], "EPSG:8857", 0)


def test_clip_to_domain_clamps_polar_data_instead_of_rejecting():
    geoms = [shapely.Point(10, 90.0000001), shapely.Point(20, 89.5),
             shapely.Polygon([(0, 80), (10, 80), (10, 90.2), (0, 90.2), (0, 80)])]
    kept = transform_chunk_bytes(chunk(geoms), [Reproject(clip_to_domain=True)], "EPSG:4326", 0)
    assert (kept.rows_out, kept.rows_rejected) == (3, 0)
    out = read_chunk(kept.data)
    assert out.geometry[0].equals_exact(shapely.Point(10, 90), 0)
    assert out.geometry[2].bounds[3] == 90
    mercator = transform_chunk_bytes(chunk(geoms), [Reproject(clip_to_domain=True)],
                                     "EPSG:3857", 0)
    assert mercator.rows_rejected == 0
    edge = read_chunk(mercator.data).geometry.bounds["maxy"].tolist()
    # clamped to Web Mercator's area of use (85.06 N): on the map's edge, not 2.4e8 m away
    north = CRS("EPSG:3857").area_of_use.north
    assert max(edge) == pytest.approx(CRS_points("EPSG:3857", [0.0], [north])[1][0], rel=1e-12)
    unclipped = transform_chunk_bytes(chunk(geoms), [Reproject()], "EPSG:3857", 0)
    assert unclipped.rows_out == 0 and unclipped.rows_rejected == 3


def test_in_domain_chunks_keep_the_array_path_and_out_of_domain_ones_leave_it(monkeypatch):
    taken = []
    original = arrays_module.transform_array_chunk

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        taken.append(result is not None)
        return result

    monkeypatch.setattr("libs.transformations.chunk.transform_array_chunk", spy)
    lines = [shapely.LineString([(0, 0), (1, 1)]), shapely.LineString([(2, 2), (3, 3)])]
    steps = [Reproject(), MakeValid()]
    transform_chunk_bytes(chunk(lines), steps, "EPSG:3857", 0)
    transform_chunk_bytes(chunk([lines[0], shapely.LineString([(0, 0), (1, 91)])]), steps,
                          "EPSG:3857", 0)
    transform_chunk_bytes(chunk([lines[0], shapely.LineString([(0, 0), (1, 90)])]), steps,
                          "EPSG:3857", 0)  # inside the source, outside the target
    transform_chunk_bytes(chunk(lines), [Reproject(clip_to_domain=True)], "EPSG:3857", 0)
    assert taken == [True, False, False, False]


def test_swapped_easting_and_northing_fail_too():
    x, y = CRS_points("EPSG:25833", [15.0, 16.0, 14.0], [60.0, 61.0, 62.0])
    geoms = [shapely.Point(b, a) for a, b in zip(x, y, strict=True)]  # (northing, easting)
    with pytest.raises(TransformError, match=r"ETRS89 / UTM zone 33N.*did you swap x and y\?"):
        transform_chunk_bytes(chunk(geoms, "EPSG:25833"), [Reproject()], "EPSG:4326", 0)


def test_clip_to_domain_from_a_projected_source_clamps_through_lon_lat():
    x, y = CRS_points("EPSG:25833", [15.0, 15.0], [60.0, 89.0])  # 89 N: outside UTM 33N's box
    geoms = [shapely.Point(x[0], y[0]), shapely.Point(x[1], y[1])]
    result = transform_chunk_bytes(chunk(geoms, "EPSG:25833"),
                                   [Reproject(clip_to_domain=True)], "EPSG:3857", 0)
    assert (result.rows_out, result.rows_rejected) == (2, 0)
    north = CRS("EPSG:3857").area_of_use.north
    edge = CRS_points("EPSG:3857", [0.0], [north])[1][0]
    assert read_chunk(result.data).geometry.y.max() == pytest.approx(edge, rel=1e-9)
