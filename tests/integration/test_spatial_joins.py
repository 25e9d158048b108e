"""Every join kind × how × result shape in PostGIS, against geopandas on the same data.

Layers are loaded with ``libs.postgis.load`` into a run schema of this module's own, the join
runs with ``libs.postgis.join`` and its result is streamed back as Arrow. Expected results
come from ``geopandas.sjoin`` / ``sjoin_nearest``, or from brute force over every pair where
geopandas has no equivalent (k > 1 nearest, distances on the ellipsoid via ``pyproj.Geod``).
Row ids are positions in the frames, and every layer carries them as an id column too.

The data are seeded and tie-free (asserted): no pair sits at a dwithin distance or a
max_distance within a millimetre, and no two candidates tie at a k-th nearest distance.
"""

import io
import json
import uuid

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyogrio
import pytest
import shapely
from dagster import DagsterInstance
from psycopg import sql
from pyproj import Geod

from etl_pipelines.sensors.discovery import CURSOR_VERSION
from libs.errors import LoadError, ReconciliationError
from libs.geoparquet import GEOMETRY, geometry_type_names
from libs.lake import completion_key
from libs.manifest import MANIFEST_FILENAME, SpatialJoin
from libs.postgis import (
    LayerTable,
    attribute_schema,
    column_geometry_type,
    connect,
    copy_chunk_into_table,
    create_layer_table,
    create_schema,
    drop_schema,
    index_and_analyze,
    reconcile_join,
    run_schema_name,
    run_spatial_join,
    spatial_index_for,
    stream_table,
)
from libs.postgis.join import subdivided_query_or_none
from libs.postgis.join_sql import (
    join_output_schema,
    spatial_join_query,
    subdivides,
)
from libs.sample_batch import NATURAL_EARTH_DIR, synthetic_points
from tests.integration.pipeline import land_sample, request_for, run_ingest, sensor_tick

pytestmark = pytest.mark.integration

EQUAL_EARTH = 8857  # the sample batch's target CRS (metres)
UTM_32N = 32632  # metres, covers the sites and stations
WGS84 = 4326
DWITHIN_M = 25_000.0
MAX_DISTANCE_M = 15_000.0
GEOD = Geod(ellps="WGS84")


# --- data -------------------------------------------------------------------------------------

def _countries() -> gpd.GeoDataFrame:
    frame = pyogrio.read_dataframe(NATURAL_EARTH_DIR / "naturalearth_lowres.shp")
    frame = frame.to_crs(epsg=EQUAL_EARTH)
    frame["geometry"] = frame.geometry.make_valid()
    frame.insert(0, "country_id", np.arange(len(frame), dtype="int64"))
    return frame[["country_id", "name", "iso_a3", "pop_est", "geometry"]]


def _points() -> gpd.GeoDataFrame:
    return synthetic_points(400, seed=7).to_crs(epsg=EQUAL_EARTH)


def _lonlat(n: int, seed: int, lon: tuple[float, float], lat: tuple[float, float],
            id_column: str) -> gpd.GeoDataFrame:
    rng = np.random.default_rng(seed)
    return gpd.GeoDataFrame(
        {id_column: np.arange(n, dtype="int64"), "score": np.round(rng.uniform(0, 100, n), 2)},
        geometry=gpd.points_from_xy(rng.uniform(*lon, n), rng.uniform(*lat, n)),
        crs=f"EPSG:{WGS84}",
    )


def _sites() -> gpd.GeoDataFrame:
    """Left points; some fall outside the stations' box, so some have no match."""
    return _lonlat(120, 11, (4.5, 9.5), (43.5, 48.5), "site_id")


def _stations() -> gpd.GeoDataFrame:
    return _lonlat(300, 12, (5.0, 9.0), (44.0, 48.0), "station_id")


def _load(conn, schema: str, name: str, frame: gpd.GeoDataFrame,
          spatial_index: str = "gist") -> LayerTable:
    attributes = pa.Table.from_pandas(pd.DataFrame(frame.drop(columns="geometry")),
                                      preserve_index=False)
    chunk = attributes.append_column(
        GEOMETRY, pa.array(shapely.to_wkb(frame.geometry.values), type=pa.binary()))
    layer = LayerTable(schema, name, attribute_schema(chunk), frame.crs.to_epsg(),
                       column_geometry_type(geometry_type_names(frame.geometry.values)))
    create_layer_table(conn, layer)
    copy_chunk_into_table(conn, layer, chunk, (0, len(frame)))
    index_and_analyze(conn, layer, spatial_index=spatial_index)
    return layer


@pytest.fixture(scope="module")
def frames() -> dict[str, gpd.GeoDataFrame]:
    sites, stations = _sites(), _stations()
    points = _points()
    return {
        "countries": _countries(), "points": points, "points_brin": points,
        "sites": sites, "stations": stations,
        "sites_utm": sites.to_crs(epsg=UTM_32N), "stations_utm": stations.to_crs(epsg=UTM_32N),
        # the same in 3D, heights up to 50 km apart: a 3D distance would change every match
        "sites_3d": _with_z(sites.to_crs(epsg=UTM_32N), 13),
        "stations_3d": _with_z(stations.to_crs(epsg=UTM_32N), 14),
        "countries_3d": _with_z(_countries(), 15),
    }


def _with_z(frame: gpd.GeoDataFrame, seed: int) -> gpd.GeoDataFrame:
    """``frame`` with a random height per row (every vertex of a row at that height)."""
    heights = np.random.default_rng(seed).uniform(0, 50_000, len(frame))
    geoms = [shapely.force_3d(g, z) for g, z in zip(frame.geometry.values, heights, strict=True)]
    return frame.set_geometry(gpd.GeoSeries(geoms, crs=frame.crs, index=frame.index))


@pytest.fixture(scope="module")
def db(postgis_settings, frames):
    """A connection holding this module's run schema with every layer loaded."""
    schema = run_schema_name(str(uuid.uuid4()))
    with connect(postgis_settings, autocommit=True) as conn:
        create_schema(conn, schema)
        try:
            layers = {name: _load(conn, schema, name, frame,
                                  "brin" if name.endswith("_brin") else "gist")
                      for name, frame in frames.items()}
            yield conn, layers
        finally:
            drop_schema(conn, schema)


def _join(**fields) -> SpatialJoin:
    return SpatialJoin.model_validate({"name": f"j_{uuid.uuid4().hex[:12]}", **fields})


def _run(db, join: SpatialJoin) -> pd.DataFrame:
    """Run the join, stream it in small batches, reconcile, return it in streamed order."""
    conn, layers = db
    left, right = layers[join.left], layers[join.right]
    result = run_spatial_join(conn, join, left, right)
    assert result.attributes == join_output_schema(join, left, right)
    batches = list(stream_table(conn, result, batch_rows=97))
    assert all(b.schema.names == [*result.attributes.names, GEOMETRY] for b in batches)
    rows = sum(b.num_rows for b in batches)
    reconcile_join(conn, join, left, result, rows)
    if not batches:
        return pd.DataFrame(columns=[*result.attributes.names, GEOMETRY])
    return pa.concat_tables(batches).to_pandas()


# --- expected results -------------------------------------------------------------------------

def _pairs_from_sjoin(joined: gpd.GeoDataFrame) -> pd.DataFrame:
    """(left, right) positions of an inner sjoin; positions are the frames' RangeIndex."""
    return pd.DataFrame({"left": joined.index.to_numpy(),
                         "right": joined["index_right"].to_numpy()}).astype("int64")


def _planar_distances(left: gpd.GeoDataFrame, right: gpd.GeoDataFrame) -> np.ndarray:
    return shapely.distance(left.geometry.to_numpy()[:, None], right.geometry.to_numpy()[None, :])


def _geodesic_distances(left: gpd.GeoDataFrame, right: gpd.GeoDataFrame) -> np.ndarray:
    n, m = len(left), len(right)
    _, _, metres = GEOD.inv(np.repeat(left.geometry.x.to_numpy(), m),
                            np.repeat(left.geometry.y.to_numpy(), m),
                            np.tile(right.geometry.x.to_numpy(), n),
                            np.tile(right.geometry.y.to_numpy(), n))
    return np.asarray(metres).reshape(n, m)


def _within_pairs(distances: np.ndarray, limit: float) -> pd.DataFrame:
    margin = np.abs(distances - limit).min()
    assert margin > 1e-3, f"test data not tie-free: a pair is {margin} m from the limit"
    left, right = np.nonzero(distances <= limit)
    return pd.DataFrame({"left": left, "right": right, "distance": distances[left, right]})


def _nearest_pairs(distances: np.ndarray, k: int, max_distance: float | None) -> pd.DataFrame:
    """Brute-force k nearest per left row; asserts no tie at any rank that decides membership."""
    order = np.argsort(distances, axis=1, kind="stable")
    ranked = np.take_along_axis(distances, order, axis=1)
    if ranked.shape[1] > k:
        deciding = ranked[:, k - 1] <= (np.inf if max_distance is None else max_distance)
        gaps = (ranked[:, k] - ranked[:, k - 1])[deciding]
        assert gaps.min() > 1e-6, "test data not tie-free at the k-th nearest distance"
    if max_distance is not None:
        assert np.abs(distances - max_distance).min() > 1e-3, "a pair sits at max_distance"
    rows = [(i, order[i, j], ranked[i, j]) for i in range(len(distances)) for j in range(k)
            if max_distance is None or ranked[i, j] <= max_distance]
    return pd.DataFrame(rows, columns=["left", "right", "distance"]).astype(
        {"left": "int64", "right": "int64"})


def _expected_carry(pairs: pd.DataFrame, n_left: int, how: str) -> pd.DataFrame:
    """Pairs sorted like the result; a left join adds each unmatched left row with NaNs."""
    if how == "left":
        missing = sorted(set(range(n_left)) - set(pairs["left"]))
        pairs = pd.concat([pairs, pd.DataFrame({"left": missing})], ignore_index=True)
    by = ["left", "distance", "right"] if "distance" in pairs else ["left", "right"]
    return pairs.sort_values(by, na_position="last").reset_index(drop=True)


def _expected_aggregates(pairs: pd.DataFrame, values: pd.Series, n_left: int,
                         how: str) -> pd.DataFrame:
    matched = pairs.assign(value=values.to_numpy()[pairs["right"].to_numpy()])
    grouped = matched.groupby("left")["value"].agg(["size", "sum", "mean"])
    expected = grouped.reindex(range(n_left)) if how == "left" else grouped
    expected["size"] = expected["size"].fillna(0).astype("int64")
    expected.loc[expected["size"] == 0, "sum"] = np.nan
    return expected.sort_index()


def _assert_aggregates(ours: pd.DataFrame, left_id: str, expected: pd.DataFrame) -> None:
    assert ours[left_id].tolist() == expected.index.tolist()  # streamed in left order
    np.testing.assert_array_equal(ours["n"].to_numpy(), expected["size"].to_numpy())
    np.testing.assert_allclose(ours["total"].to_numpy(dtype=float),
                               expected["sum"].to_numpy(dtype=float), rtol=1e-9)
    np.testing.assert_allclose(ours["average"].to_numpy(dtype=float),
                               expected["mean"].to_numpy(dtype=float), rtol=1e-9)


def _assert_carry(ours: pd.DataFrame, left_id: str, right_id: str, expected: pd.DataFrame,
                  distance_rtol: float | None = None) -> None:
    """Row by row in streamed order, which must already be (left, distance, right)."""
    assert len(ours) == len(expected)
    assert ours[left_id].tolist() == expected["left"].tolist()
    got_right = ours[right_id].astype("Float64").tolist()
    want_right = expected["right"].astype("Float64").tolist()
    assert [None if pd.isna(v) else v for v in got_right] == \
        [None if pd.isna(v) else v for v in want_right]
    if distance_rtol is not None:
        np.testing.assert_allclose(ours["distance"].to_numpy(dtype=float),
                                   expected["distance"].to_numpy(dtype=float),
                                   rtol=distance_rtol, atol=1e-6)


AGGREGATES = [{"function": "count", "output": "n"},
              {"function": "sum", "column": "value", "output": "total"},
              {"function": "mean", "column": "value", "output": "average"}]

# (predicate, left, right, left id, right id, numeric right column)
PREDICATE_CASES = [
    ("intersects", "countries", "points", "country_id", "point_id", "value"),
    ("contains", "countries", "points", "country_id", "point_id", "value"),
    ("within", "points", "countries", "point_id", "country_id", "pop_est"),
    # the probed points behind a BRIN index instead of GiST (what the load op gives a point
    # layer that only bbox operators probe)
    ("intersects", "countries", "points_brin", "country_id", "point_id", "value"),
    ("contains", "countries", "points_brin", "country_id", "point_id", "value"),
]


def _aggregates_of(column: str) -> list[dict]:
    return [dict(a, column=column) if "column" in a else a for a in AGGREGATES]


# --- intersects / contains / within -----------------------------------------------------------

@pytest.mark.parametrize("how", ["left", "inner"])
@pytest.mark.parametrize(("predicate", "left", "right", "left_id", "right_id", "value"),
                         PREDICATE_CASES)
def test_predicate_aggregates_equal_sjoin(db, frames, predicate, left, right, left_id, right_id,
                                          value, how):
    join = _join(left=left, right=right, predicate=predicate, how=how,
                 aggregations=_aggregates_of(value))
    ours = _run(db, join)
    pairs = _pairs_from_sjoin(gpd.sjoin(frames[left], frames[right], predicate=predicate))
    assert len(pairs) > 50
    expected = _expected_aggregates(pairs, frames[right][value], len(frames[left]), how)
    _assert_aggregates(ours, left_id, expected)
    if how == "left":
        assert (expected["size"] == 0).any(), "the data should leave some left rows unmatched"


@pytest.mark.parametrize("how", ["left", "inner"])
@pytest.mark.parametrize(("predicate", "left", "right", "left_id", "right_id", "value"),
                         PREDICATE_CASES)
def test_predicate_carry_equals_sjoin(db, frames, predicate, left, right, left_id, right_id,
                                      value, how):
    join = _join(left=left, right=right, predicate=predicate, how=how,
                 carry=[right_id, {"column": value, "output": "carried_value"}])
    ours = _run(db, join)
    expected_frame = gpd.sjoin(frames[left], frames[right], predicate=predicate, how=how)
    pairs = _pairs_from_sjoin(expected_frame.dropna(subset=["index_right"]))
    expected = _expected_carry(pairs, len(frames[left]), how)
    assert len(ours) == len(expected_frame)
    _assert_carry(ours, left_id, f"right_{right_id}", expected)
    values = frames[right][value].to_numpy(dtype=float)
    want = [values[int(r)] if pd.notna(r) else np.nan for r in expected["right"]]
    np.testing.assert_array_equal(ours["carried_value"].to_numpy(dtype=float), want)
    # the left attributes and geometry are the left row's
    left_frame = frames[left]
    assert (ours[left_id].to_numpy() == left_frame[left_id].to_numpy()[ours[left_id]]).all()
    geoms = shapely.from_wkb(ours[GEOMETRY].to_numpy())
    assert shapely.equals_exact(geoms, left_frame.geometry.values[ours[left_id].to_numpy()]).all()


# --- dwithin ----------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["left", "inner"])
def test_dwithin_projected_equals_sjoin_dwithin(db, frames, how):
    left, right = frames["sites_utm"], frames["stations_utm"]
    joined = gpd.sjoin(left, right, predicate="dwithin", distance=DWITHIN_M)
    pairs = _pairs_from_sjoin(joined)
    distances = _planar_distances(left, right)
    assert pairs.sort_values(["left", "right"]).reset_index(drop=True).equals(
        _within_pairs(distances, DWITHIN_M)[["left", "right"]])
    pairs["distance"] = distances[pairs["left"], pairs["right"]]

    carried = _run(db, _join(left="sites_utm", right="stations_utm", predicate="dwithin",
                             distance=DWITHIN_M, how=how, carry=["station_id"]))
    _assert_carry(carried, "site_id", "right_station_id",
                  _expected_carry(pairs, len(left), how), distance_rtol=1e-12)

    aggregated = _run(db, _join(left="sites_utm", right="stations_utm", predicate="dwithin",
                                distance=DWITHIN_M, how=how,
                                aggregations=_aggregates_of("score")))
    _assert_aggregates(aggregated, "site_id",
                       _expected_aggregates(pairs, right["score"], len(left), how))


@pytest.mark.parametrize("how", ["left", "inner"])
def test_dwithin_geographic_measures_on_the_ellipsoid(db, frames, how):
    left, right = frames["sites"], frames["stations"]
    pairs = _within_pairs(_geodesic_distances(left, right), DWITHIN_M)
    assert 100 < len(pairs) and pairs["left"].nunique() < len(left)
    carried = _run(db, _join(left="sites", right="stations", predicate="dwithin",
                             distance=DWITHIN_M, how=how, carry=["station_id", "score"]))
    expected = _expected_carry(pairs, len(left), how)
    _assert_carry(carried, "site_id", "right_station_id", expected, distance_rtol=1e-9)

    aggregated = _run(db, _join(left="sites", right="stations", predicate="dwithin",
                                distance=DWITHIN_M, how=how,
                                aggregations=_aggregates_of("score")))
    _assert_aggregates(aggregated, "site_id",
                       _expected_aggregates(pairs, right["score"], len(left), how))


def test_geographic_and_planar_dwithin_agree_on_close_points(db, frames):
    """Over 25 km in UTM near its central meridian the two measures differ by < 0.1 %:
    the same pairs, distances within that tolerance."""
    planar = _run(db, _join(left="sites_utm", right="stations_utm", predicate="dwithin",
                            distance=DWITHIN_M, how="inner", carry=["station_id"]))
    geodesic = _run(db, _join(left="sites", right="stations", predicate="dwithin",
                              distance=DWITHIN_M, how="inner", carry=["station_id"]))
    key = ["site_id", "right_station_id"]
    merged = planar.merge(geodesic, on=key, how="outer", suffixes=("_p", "_g"), indicator=True)
    borderline = merged[merged["_merge"] != "both"]
    assert len(borderline) <= 0.02 * len(merged)
    both = merged[merged["_merge"] == "both"]
    np.testing.assert_allclose(both["distance_p"], both["distance_g"], rtol=1e-3)


# --- nearest ----------------------------------------------------------------------------------

@pytest.mark.parametrize("max_distance", [None, MAX_DISTANCE_M])
@pytest.mark.parametrize("how", ["left", "inner"])
def test_nearest_k1_equals_sjoin_nearest(db, frames, how, max_distance):
    left, right = frames["sites_utm"], frames["stations_utm"]
    joined = gpd.sjoin_nearest(left, right, how=how, max_distance=max_distance,
                               distance_col="expected_distance")
    assert not joined.index.duplicated().any(), "ties in the test data"
    matched = joined.dropna(subset=["index_right"])
    pairs = _pairs_from_sjoin(matched).assign(distance=matched["expected_distance"].to_numpy())
    ours = _run(db, _join(left="sites_utm", right="stations_utm", predicate="nearest", k=1,
                          max_distance=max_distance, how=how, carry=["station_id"]))
    assert len(ours) == len(joined)
    _assert_carry(ours, "site_id", "right_station_id", _expected_carry(pairs, len(left), how),
                  distance_rtol=1e-12)
    if max_distance is not None and how == "left":
        assert ours["right_station_id"].isna().any()


@pytest.mark.parametrize("how", ["left", "inner"])
def test_nearest_polygon_equals_sjoin_nearest(db, frames, how):
    """Points to their nearest country: distance 0 inside, true polygon distance outside."""
    left, right = frames["points"], frames["countries"]
    joined = gpd.sjoin_nearest(left, right, how=how, distance_col="expected_distance")
    assert not joined.index.duplicated().any(), "ties in the test data"
    pairs = _pairs_from_sjoin(joined).assign(distance=joined["expected_distance"].to_numpy())
    ours = _run(db, _join(left="points", right="countries", predicate="nearest", k=1, how=how,
                          carry=["name", "country_id"]))
    _assert_carry(ours, "point_id", "right_country_id", _expected_carry(pairs, len(left), how),
                  distance_rtol=1e-9)
    assert ours["right_name"].tolist() == right["name"].to_numpy()[ours["right_country_id"]].tolist()


@pytest.mark.parametrize("max_distance", [None, MAX_DISTANCE_M])
@pytest.mark.parametrize("how", ["left", "inner"])
@pytest.mark.parametrize(("left", "right", "measure"),
                         [("sites_utm", "stations_utm", _planar_distances),
                          ("sites", "stations", _geodesic_distances)],
                         ids=["projected", "geographic"])
def test_nearest_k3_equals_brute_force(db, frames, left, right, measure, how, max_distance):
    pairs = _nearest_pairs(measure(frames[left], frames[right]), 3, max_distance)
    ours = _run(db, _join(left=left, right=right, predicate="nearest", k=3,
                          max_distance=max_distance, how=how, carry=["station_id"]))
    _assert_carry(ours, "site_id", "right_station_id",
                  _expected_carry(pairs, len(frames[left]), how), distance_rtol=1e-9)


@pytest.mark.parametrize("how", ["left", "inner"])
def test_nearest_aggregates_equal_brute_force(db, frames, how):
    """Each point with count/sum/mean of pop_est over its 3 nearest countries within 500 km."""
    left, right = frames["points"], frames["countries"]
    pairs = _nearest_pairs(_planar_distances(left, right), 3, 500_000.0)
    assert pairs["left"].nunique() < len(left), "some points should have no country in reach"
    ours = _run(db, _join(left="points", right="countries", predicate="nearest", k=3,
                          max_distance=500_000.0, how=how, aggregations=_aggregates_of("pop_est")))
    _assert_aggregates(ours, "point_id",
                       _expected_aggregates(pairs, right["pop_est"], len(left), how))


def test_nearest_ties_go_to_the_right_row_loaded_first(db):
    conn, layers = db
    schema = layers["sites"].schema
    here = gpd.GeoDataFrame({"here_id": [0]}, geometry=[shapely.Point(0, 0)], crs=UTM_32N)
    # four rows at distance 1, loaded in the order 0..3; and one at distance 2
    there = gpd.GeoDataFrame({"there_id": [0, 1, 2, 3, 4]},
                             geometry=shapely.points([(0, 1), (1, 0), (0, -1), (-1, 0), (2, 0)]),
                             crs=UTM_32N)
    layers["here"] = _load(conn, schema, "here", here)
    layers["there"] = _load(conn, schema, "there", there)
    ours = _run(db, _join(left="here", right="there", predicate="nearest", k=2,
                          carry=["there_id"]))
    assert ours["right_there_id"].tolist() == [0, 1]
    assert ours["distance"].tolist() == [1.0, 1.0]


# --- intersects part by part ----------------------------------------------------------------

def test_intersects_by_parts_counts_points_where_parts_touch_once(db):
    """A MultiPolygon whose parts touch at corners (the left row is joined part by part):
    points on those corners, on shared-corner edges and inside are counted, summed and
    averaged once, equal to sjoin on the whole geometry. A second, overlapping polygon and
    an unmatched one keep left rows apart."""
    conn, layers = db
    schema = layers["sites"].schema
    stairs = shapely.MultiPolygon([shapely.box(0, 0, 10, 10), shapely.box(10, 10, 20, 20),
                                   shapely.box(20, 0, 30, 10), shapely.box(30, 10, 40, 20)])
    assert stairs.is_valid
    zones = gpd.GeoDataFrame({"zone_id": [0, 1, 2]}, crs=UTM_32N, geometry=[
        stairs, shapely.box(5, 5, 25, 15), shapely.box(500, 500, 501, 501)])
    corners = np.array([(10, 10), (20, 10), (30, 10), (0, 0), (40, 20), (10, 5), (15, 10)])
    rng = np.random.default_rng(5)
    xy = np.concatenate([corners, corners, rng.uniform(-2, 42, (500, 2))])  # corners twice
    pins = gpd.GeoDataFrame({"pin_id": np.arange(len(xy), dtype="int64"),
                             "weight": rng.integers(1, 1_000, len(xy)).astype("int64"),
                             "score": np.round(rng.uniform(0, 100, len(xy)), 2)},
                            geometry=shapely.points(xy), crs=UTM_32N)
    layers["zones"] = _load(conn, schema, "zones", zones)
    layers["pins"] = _load(conn, schema, "pins", pins)
    aggregations = [*_aggregates_of("score"),
                    {"function": "sum", "column": "weight", "output": "weight_sum"},
                    {"function": "mean", "column": "weight", "output": "weight_mean"}]
    pairs = _pairs_from_sjoin(gpd.sjoin(zones, pins, predicate="intersects"))
    assert pairs[pairs["left"] == 0]["right"].isin([0, 1, 2, 7, 8, 9]).sum() == 6
    for how in ("left", "inner"):
        join = _join(left="zones", right="pins", predicate="intersects", how=how,
                     aggregations=aggregations)
        assert subdivides(join, layers["zones"], layers["pins"])
        ours = _run(db, join)
        _assert_aggregates(ours, "zone_id", _expected_aggregates(pairs, pins["score"], 3, how))
        weights = _expected_aggregates(pairs, pins["weight"], 3, how)
        np.testing.assert_array_equal(ours["weight_sum"].to_numpy(dtype=float),
                                      weights["sum"].to_numpy(dtype=float))
        np.testing.assert_allclose(ours["weight_mean"].to_numpy(dtype=float),
                                   weights["mean"].to_numpy(dtype=float), rtol=1e-12)


def test_intersects_of_polygons_with_polygons_equals_sjoin(db, frames):
    """Neighbouring countries: a polygon right side is joined whole, not subdivided."""
    join = _join(left="countries", right="countries", predicate="intersects", how="left",
                 aggregations=_aggregates_of("pop_est"))
    _, layers = db
    assert not subdivides(join, layers["countries"], layers["countries"])
    ours = _run(db, join)
    countries = frames["countries"]
    pairs = _pairs_from_sjoin(gpd.sjoin(countries, countries, predicate="intersects"))
    _assert_aggregates(ours, "country_id",
                       _expected_aggregates(pairs, countries["pop_est"], len(countries), "left"))


# --- how the SQL runs -------------------------------------------------------------------------

@pytest.mark.parametrize(("left", "right", "knn"), [
    ("sites_utm", "stations_utm", "Order By: (geom <-> "),
    ("sites", "stations", "Order By: ((geom)::geography <-> "),
], ids=["projected", "geographic"])
def test_nearest_walks_the_gist_index_in_knn_order(db, left, right, knn):
    conn, layers = db
    join = _join(left=left, right=right, predicate="nearest", k=3, carry=["station_id"])
    run_spatial_join(conn, join, layers[left], layers[right])  # builds the geography index
    with conn.transaction():
        # a few hundred rows are cheaper to scan; the plan shape is what is asserted here
        conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute(
            b"EXPLAIN " + spatial_join_query(join, layers[left], layers[right]).as_bytes(conn)))
    assert knn in plan and "Index Scan using" in plan, plan


@pytest.mark.parametrize(("predicate", "geometry_type", "layer", "index"), [
    ("intersects", "Point", "right", "brin"),
    ("contains", "Point", "right", "brin"),
    ("within", "Point", "right", "brin"),
    ("intersects", "MultiPolygon", "right", "gist"),
    ("intersects", "Geometry", "right", "gist"),
    ("dwithin", "Point", "right", "gist"),
    ("nearest", "Point", "right", "gist"),
    ("intersects", "Point", "left", None),
    ("intersects", "Point", "other", None),
])
def test_only_the_probed_layer_is_indexed_and_bbox_probed_points_get_brin(
        predicate, geometry_type, layer, index):
    extra = {"dwithin": {"distance": 10.0}, "nearest": {"k": 1}}.get(predicate, {})
    join = _join(left="left", right="right", predicate=predicate, how="left",
                 aggregations=[{"function": "count", "output": "n"}], **extra)
    assert spatial_index_for(join, layer, geometry_type) == index


def test_intersects_by_parts_probes_a_brin_indexed_point_layer(db, frames):
    """200k points in spatial order behind BRIN: the parts are scanned in parallel and each
    probes the points' BRIN index (scanning every point and testing it against the parts,
    which PostgreSQL preferred while the parts had a GiST index, was 20x slower)."""
    conn, layers = db
    schema = layers["countries"].schema
    grid = LayerTable(schema, "grid_brin", pa.schema([pa.field("value", pa.float64())]),
                      EQUAL_EARTH, "Point")
    create_layer_table(conn, grid)
    conn.execute(sql.SQL(
        "INSERT INTO {}.grid_brin (_row_id, value, geom) SELECT row_number() OVER (ORDER BY "
        "ST_GeoHash(ST_Transform(geom, 4326))) - 1, value, geom FROM (SELECT (i % 97)::float8 "
        "AS value, ST_SetSRID(ST_MakePoint(-1.6e7 + (i % 500) * 64000.0, -7.5e6 + (i / 500) "
        "* 37500.0), 8857) AS geom FROM generate_series(0, 199999) i) g ORDER BY 1").format(
        sql.Identifier(schema)))
    index_and_analyze(conn, grid, spatial_index="brin")
    join = _join(left="countries", right="grid_brin", predicate="intersects", how="left",
                 aggregations=_aggregates_of("value"))
    with conn.transaction(force_rollback=True):  # the parts tables go with the rollback
        query = subdivided_query_or_none(conn, join, layers["countries"], grid)
        assert query is not None
        plan = "\n".join(r[0] for r in conn.execute(b"EXPLAIN " + query.as_bytes(conn)))
    assert "Bitmap Index Scan on grid_brin_geom_idx" in plan, plan
    assert "Seq Scan on grid_brin" not in plan, plan
    assert "Parallel Seq Scan on" in plan and "_pieces p" in plan, plan


def test_result_streams_in_batches_in_deterministic_order(db):
    join = _join(left="sites_utm", right="stations_utm", predicate="dwithin",
                 distance=DWITHIN_M, carry=["station_id"])
    first, again = _run(db, join), _run(db, join.model_copy(update={"name": join.name + "_b"}))
    pd.testing.assert_frame_equal(first, again)
    keys = first[["site_id", "distance", "right_station_id"]]
    assert keys.equals(keys.sort_values(["site_id", "distance", "right_station_id"],
                                        na_position="last"))


@pytest.mark.parametrize("predicate, extra", [("dwithin", {"distance": DWITHIN_M}),
                                               ("nearest", {"k": 2})])
def test_3d_layers_join_with_2d_predicates_and_distances(db, predicate, extra):
    """Issue 27: 3D layers (PointZ, MultiPolygonZ columns) join as their 2D selves do: the
    predicates and distances are 2D, whatever the heights."""
    conn, layers = db
    assert (layers["sites_3d"].geometry_type, layers["countries_3d"].geometry_type) == (
        "PointZ", "GeometryZ")
    flat = _run(db, _join(left="sites_utm", right="stations_utm", predicate=predicate,
                          carry=["station_id"], **extra))
    high = _run(db, _join(left="sites_3d", right="stations_3d", predicate=predicate,
                          carry=["station_id"], **extra))
    assert len(high) == len(flat) > 0
    assert high["right_station_id"].fillna(-1).tolist() == flat["right_station_id"].fillna(-1).tolist()
    np.testing.assert_allclose(high["distance"], flat["distance"], rtol=1e-12)
    counts = {name: _run(db, _join(left=name, right="points", predicate="intersects",
                                   aggregations=[{"function": "count", "output": "n"}]))
              for name in ("countries", "countries_3d")}
    assert counts["countries_3d"]["n"].tolist() == counts["countries"]["n"].tolist()


# --- through the pipeline -------------------------------------------------------------------

def test_carrying_nearest_join_through_the_ingest_job(store, landing_store, tmp_path):
    """The load_and_join op publishes a carrying join as GeoParquet: one row per point with its
    nearest country's name and distance, equal to sjoin_nearest on the landed files."""
    batch_id = f"knn-{uuid.uuid4().hex[:12]}"

    def nearest_country(manifest: dict) -> dict:
        manifest["join"] = {"name": "nearest_country", "left": "points", "right": "countries",
                            "predicate": "nearest", "k": 1, "carry": ["name"],
                            "distance_column": "metres_away"}
        return manifest

    land_sample(landing_store, tmp_path, batch_id, n_points=1_000, edit=nearest_country)
    # the sensor takes a bounded number of manifests per tick, and earlier sessions leave many
    # in the landing zone: start from a cursor that has seen all but this batch's
    seen = {o.key: o.etag for o in store.list("landing-zone")
            if o.key.endswith(f"/{MANIFEST_FILENAME}") and not o.key.startswith(f"{batch_id}/")}
    cursor = json.dumps({"version": CURSOR_VERSION, "processed": seen})
    with DagsterInstance.ephemeral() as instance:
        result = run_ingest(instance, request_for(sensor_tick(instance, cursor), batch_id))
    assert result.success
    completion = json.loads(store.get_bytes("data-lake", completion_key(batch_id)))
    parts = [gpd.read_parquet(io.BytesIO(store.get_bytes("data-lake", o["key"])))
             for o in completion["datasets"]["nearest_country"]["objects"]]
    ours = pd.concat(parts, ignore_index=True)
    assert list(ours.columns[:5]) == ["point_id", "value", "category", "right_name", "metres_away"]

    folder = tmp_path / batch_id
    points = pyogrio.read_dataframe(folder / "points.fgb").to_crs(epsg=EQUAL_EARTH)
    countries = pyogrio.read_dataframe(f"/vsizip/{folder / 'countries.zip'}").to_crs(epsg=EQUAL_EARTH)
    countries["geometry"] = countries.geometry.make_valid()
    expected = gpd.sjoin_nearest(points, countries, distance_col="metres_away")
    # sjoin_nearest returns every tied country (a few points are nearest to a border vertex
    # on the coast); the join keeps exactly one, the country loaded first
    assert expected.index.duplicated().sum() > 0
    tied = expected.groupby("point_id").agg(names=("name", set), metres_away=("metres_away", "first"))
    assert sorted(ours["point_id"]) == sorted(tied.index) and ours["point_id"].is_unique
    tied = tied.loc[ours["point_id"]]
    assert all(name in names for name, names in zip(ours["right_name"], tied["names"], strict=True))
    np.testing.assert_allclose(ours["metres_away"], tied["metres_away"], rtol=1e-6, atol=1e-3)


# --- errors -----------------------------------------------------------------------------------

def test_missing_carry_column_names_join_column_and_choices(db):
    _, layers = db
    join = _join(left="sites", right="stations", predicate="dwithin", distance=1.0,
                 carry=["station_name"])
    with pytest.raises(LoadError, match=r"join 'j_\w+': carried column 'station_name' does "
                                        r"not exist in layer 'stations'.*'station_id', 'score'"):
        join_output_schema(join, layers["sites"], layers["stations"])


def test_sum_of_text_column_names_join_and_numeric_choices(db):
    _, layers = db
    join = _join(left="countries", right="points",
                 aggregations=[{"function": "sum", "column": "category", "output": "s"}])
    with pytest.raises(LoadError, match=r"sum needs a numeric column but 'category' of layer "
                                        r"'points' is .*choose one of \['point_id', 'value'\]"):
        join_output_schema(join, layers["countries"], layers["points"])


def test_carried_output_clashing_with_a_left_column_is_refused(db):
    _, layers = db
    join = _join(left="sites", right="stations", predicate="nearest", k=1,
                 carry=[{"column": "score", "output": "site_id"}])
    with pytest.raises(LoadError, match="'site_id' clashes with a column of layer 'sites'"):
        join_output_schema(join, layers["sites"], layers["stations"])


def test_distance_join_in_feet_is_refused(db):
    conn, layers = db
    schema = layers["sites"].schema
    feet = gpd.GeoDataFrame({"a": [1]}, geometry=[shapely.Point(1e6, 2e5)], crs="EPSG:2263")
    layers["feet_left"] = _load(conn, schema, "feet_left", feet)
    layers["feet_right"] = _load(conn, schema, "feet_right", feet.rename(columns={"a": "b"}))
    join = _join(left="feet_left", right="feet_right", predicate="dwithin", distance=10.0,
                 carry=["b"])
    with pytest.raises(LoadError, match=r"EPSG:2263 .* is projected in US survey foot, not "
                                        "metres"):
        run_spatial_join(conn, join, layers["feet_left"], layers["feet_right"])


def test_reconciliation_catches_rows_lost_in_streaming(db):
    conn, layers = db
    join = _join(left="sites", right="stations", predicate="nearest", k=2, carry=[])
    result = run_spatial_join(conn, join, layers["sites"], layers["stations"])
    reconcile_join(conn, join, layers["sites"], result, 240)
    with pytest.raises(ReconciliationError, match="240 result rows but 239 streamed out"):
        reconcile_join(conn, join, layers["sites"], result, 239)
