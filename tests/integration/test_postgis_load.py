"""Loading into PostGIS: binary COPY round trips, typed geometry columns, errors, retries.

Each test works in its own ``etl_run_<hex>`` schema, created through ``postgis.create_schema``
(so it holds the schema's advisory lock and the janitor leaves it alone) and dropped after.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import threading
import time
import uuid
from decimal import Decimal

import numpy as np
import psycopg
import pyarrow as pa
import pytest
import shapely
from psycopg import sql

from libs import postgis
from libs.errors import LoadError
from libs.geoparquet import GEOMETRY, geometry_type_names
from libs.manifest import SpatialJoin
from libs.postgis import ROW_ID, ChunkLoaded, LayerTable, load_layer_chunks
from tests.unit.test_copy_binary import ATTRIBUTES

pytestmark = pytest.mark.integration


@pytest.fixture
def schema(pg):
    name = postgis.run_schema_name(str(uuid.uuid4()))
    postgis.create_schema(pg, name)
    yield name
    postgis.drop_schema(pg, name)


def points_chunk(start: int, n: int, *, with_row_id: bool = True, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed + start)
    xy = rng.uniform(-1e6, 1e6, (n, 2))
    columns = {
        "point_id": pa.array(np.arange(start, start + n, dtype=np.int64) * 10),
        "value": pa.array(rng.random(n)),
        "category": pa.array(rng.choice(np.array(["a", "bb", "ccc"]), n)),
        GEOMETRY: pa.array(shapely.to_wkb(shapely.points(xy)), pa.binary()),
    }
    if with_row_id:
        columns = {ROW_ID: pa.array(np.arange(start, start + n, dtype=np.int64)), **columns}
    return pa.table(columns)


def points_layer(schema: str, table: str = "points", srid: int = 3857) -> LayerTable:
    attributes = postgis.attribute_schema(points_chunk(0, 1))
    return LayerTable(schema, table, attributes, srid, "Point")


def create(pg, layer: LayerTable) -> LayerTable:
    postgis.create_layer_table(pg, layer)
    return layer


def ids_and_count(pg, layer: LayerTable) -> tuple[int, int, int, int]:
    return pg.execute(sql.SQL("SELECT count(*), count(DISTINCT {id}), min({id}), max({id}) "
                              "FROM {}.{}").format(sql.Identifier(layer.schema),
                                                   sql.Identifier(layer.table),
                                                   id=sql.Identifier(ROW_ID))).fetchone()


# ------------------------------------------------------------------------- round trips


EVERY_GEOMETRY = np.array([shapely.Polygon([(0, 0), (1, 0), (1, 1)]), None,
                           shapely.MultiLineString([[(0, 0), (1, 1)], [(2, 2), (3, 1)]]),
                           shapely.Point(1.5, -2.5)], dtype=object)


def load_everything(schema: str, postgis_settings) -> tuple[LayerTable, pa.Table]:
    """Every attribute type the loader maps, with NULLs, and mixed geometries, as _row_id
    100-103 of table ``everything``."""
    chunk = pa.table({**ATTRIBUTES,
                      GEOMETRY: pa.array(shapely.to_wkb(EVERY_GEOMETRY), pa.binary())})
    layer = LayerTable(schema, "everything", postgis.attribute_schema(chunk), 3857)
    with postgis.connect(postgis_settings) as conn:
        postgis.create_layer_table(conn, layer)
        assert postgis.copy_chunk_into_table(conn, layer, chunk, (100, 104)) == 4
    return layer, chunk


def test_every_attribute_type_and_geometry_round_trips(pg, schema, postgis_settings):
    load_everything(schema, postgis_settings)
    geoms = EVERY_GEOMETRY
    names = list(ATTRIBUTES)
    pg.execute("SET TIME ZONE 'UTC'")
    rows = pg.execute(sql.SQL("SELECT {}, {}, ST_AsBinary(geom), ST_SRID(geom) FROM {}.{} "
                              "ORDER BY {}").format(
        sql.Identifier(ROW_ID), sql.SQL(", ").join(map(sql.Identifier, names)),
        sql.Identifier(schema), sql.Identifier("everything"), sql.Identifier(ROW_ID))).fetchall()
    assert [r[0] for r in rows] == [100, 101, 102, 103]
    for i, name in enumerate(names, start=1):
        expected = ATTRIBUTES[name].to_pylist()
        got = [r[i] for r in rows]
        for want, have in zip(expected, got, strict=True):
            assert _same(want, have), (name, expected, got)
    for (*_, wkb, srid), geom in zip(rows, geoms, strict=True):
        if geom is None:
            assert wkb is None
        else:
            assert shapely.equals(shapely.from_wkb(wkb), geom) and srid == 3857


THREE_D = {
    "PointZ": [shapely.Point(1, 2, 3), shapely.Point(-4, 5, -6.5)],
    "LineStringZ": [shapely.LineString([(0, 0, 1), (1, 1, 2)])],
    "MultiPolygonZ": [shapely.MultiPolygon([shapely.Polygon([(0, 0, 9), (1, 0, 9), (1, 1, 8)])])],
    "GeometryZ": [shapely.Point(1, 2, 3), shapely.Polygon([(0, 0, 9), (1, 0, 9), (1, 1, 8)])],
    postgis.ANY_DIMENSION: [shapely.Point(1, 2), shapely.Point(1, 2, 3), None],
    "PointM": [shapely.from_wkt("POINT M (1 2 4)")],
    "LineStringZM": [shapely.from_wkt("LINESTRING ZM (0 0 1 7, 1 1 2 8)")],
}


@pytest.mark.parametrize("column", list(THREE_D))
def test_3d_and_m_geometries_round_trip_in_typed_columns(pg, schema, postgis_settings, column):
    """Issue 27: Z (and M) kept in PostGIS. The column is typed from the transform's geometry
    types (``column_geometry_type``), COPY takes the ISO WKB with Z and M, and
    ``stream_table`` gives the same coordinates back; 2D beside 3D gets an untyped column."""
    geoms = np.array(THREE_D[column], dtype=object)
    assert postgis.column_geometry_type(geometry_type_names(geoms)) == column
    chunk = pa.table({"n": pa.array(np.arange(len(geoms), dtype=np.int64)),
                      GEOMETRY: pa.array(shapely.to_wkb(geoms, flavor="iso"), pa.binary())})
    layer = LayerTable(schema, "threed", postgis.attribute_schema(chunk), 3857, column)
    with postgis.connect(postgis_settings) as conn:
        postgis.create_layer_table(conn, layer)
        assert postgis.copy_chunk_into_table(conn, layer, chunk, (0, len(geoms))) == len(geoms)
    declared = pg.execute("SELECT type, coord_dimension FROM geometry_columns "
                          "WHERE f_table_schema = %s AND f_table_name = 'threed'",
                          (schema,)).fetchone()
    if column == postgis.ANY_DIMENSION:
        assert declared[0] == "GEOMETRY"
    else:
        kind = column.rstrip("ZM")
        suffix = column[len(kind):]
        # PostGIS spells a 3-dimension M type POINTM, a Z or ZM one by its plain name
        expected = kind.upper() + ("M" if suffix == "M" else "")
        assert declared == (expected, {"Z": 3, "M": 3, "ZM": 4}[suffix])
    pg.commit()
    back = pa.concat_tables(list(postgis.stream_table(pg, layer))).column(GEOMETRY).to_pylist()
    got = np.array([None if w is None else shapely.from_wkb(w) for w in back], dtype=object)
    assert list(shapely.to_wkt(got)) == list(shapely.to_wkt(geoms))  # Z and M included


def test_every_attribute_type_streams_back_out_as_it_was_loaded(pg, schema, postgis_settings):
    """``stream_table`` (ADBC) gives back each column in the Arrow type it was loaded from,
    values and NULLs included, and the geometry as WKB, in ``_row_id`` order."""
    layer, chunk = load_everything(schema, postgis_settings)
    batches = list(postgis.stream_table(pg, layer, batch_rows=3))
    assert [b.num_rows for b in batches] == [3, 1]
    streamed = pa.concat_tables(batches)
    assert streamed.schema == pa.schema([*layer.attributes, pa.field(GEOMETRY, pa.binary())])
    for name in ATTRIBUTES:
        want, have = chunk.column(name).to_pylist(), streamed.column(name).to_pylist()
        assert all(_same(w, h) for w, h in zip(want, have, strict=True)), (name, want, have)
    for wkb, geom in zip(streamed.column(GEOMETRY).to_pylist(), EVERY_GEOMETRY, strict=True):
        assert (wkb is None and geom is None) or shapely.equals(shapely.from_wkb(wkb), geom)


def test_streaming_refuses_a_connection_with_an_open_transaction(pg, schema, postgis_settings):
    """The stream reads on a connection of its own, which could not see uncommitted rows."""
    layer = create(pg, points_layer(schema))
    with postgis.connect(postgis_settings) as conn:
        conn.execute("SELECT 1")
        with pytest.raises(LoadError, match=r"open transaction \(INTRANS\); commit first"):
            next(postgis.stream_table(conn, layer))


def _same(want, have) -> bool:
    if want is None or have is None:
        return want is None and have is None
    if isinstance(want, float):
        return (math.isnan(want) and math.isnan(have)) or float(want) == float(have)
    if isinstance(want, dt.datetime) and want.tzinfo is not None:
        return want == have  # an instant: psycopg returns it in the session's zone
    if isinstance(want, int) and isinstance(have, Decimal):
        return Decimal(want) == have
    return want == have


def test_big_endian_wkb_loads_and_z_is_refused_by_a_2d_column(pg, schema, postgis_settings):
    layer = LayerTable(schema, "z", pa.schema([]), 4326)
    big_endian = pa.table({GEOMETRY: pa.array([shapely.to_wkb(shapely.Point(4, 5), byte_order=0)],
                                              pa.binary())})
    iso_z = pa.table({GEOMETRY: pa.array([shapely.to_wkb(shapely.Point(1, 2, 3), flavor="iso")],
                                         pa.binary())})
    with postgis.connect(postgis_settings) as conn:
        postgis.create_layer_table(conn, layer)
        postgis.copy_chunk_into_table(conn, layer, big_endian, (0, 1))
        with pytest.raises(LoadError, match=r"rows with _row_id 1-1: PostgreSQL rejected the "
                                            r"data at _row_id 1: Geometry has Z dimension but "
                                            r"column does not \(column geom is "
                                            r"geometry\(Geometry, 4326\)"):
            postgis.copy_chunk_into_table(conn, layer, iso_z, (1, 2))
    got = pg.execute(sql.SQL("SELECT ST_AsText(geom), ST_SRID(geom) FROM {}.z ORDER BY _row_id")
                     .format(sql.Identifier(schema))).fetchall()
    assert got == [("POINT(4 5)", 4326)]


def test_parallel_load_fills_a_typed_point_column_exactly(pg, schema, postgis_settings):
    layer = create(pg, points_layer(schema))
    spans = [(0, 2_500), (2_500, 5_000), (5_000, 9_000), (9_000, 9_001)]
    chunks = [((a, b), lambda a=a, b=b: points_chunk(a, b - a)) for a, b in spans]
    # a chunk without _row_id gets span start + position
    chunks.append(((9_001, 12_000), lambda: points_chunk(9_001, 2_999, with_row_id=False)))
    # a chunk whose rows were all rejected still owns (and clears) its span
    chunks.append(((12_000, 12_500), lambda: points_chunk(12_000, 0)))
    done: list[ChunkLoaded] = []
    callers: set[threading.Thread] = set()

    def on_chunk(loaded: ChunkLoaded) -> None:
        done.append(loaded)
        callers.add(threading.current_thread())

    rows = load_layer_chunks(postgis_settings, layer, chunks, parallelism=3, on_chunk=on_chunk)
    assert rows == 12_000 and sorted(c.id_span for c in done) == sorted(s for s, _ in chunks)
    assert callers == {threading.current_thread()}  # progress is reported in the caller's thread
    assert all(c.attempts == 1 for c in done)
    assert ids_and_count(pg, layer) == (12_000, 12_000, 0, 11_999)
    assert pg.execute("SELECT type, srid FROM geometry_columns WHERE f_table_schema = %s",
                      (schema,)).fetchone() == ("POINT", 3857)
    assert pg.execute("SELECT relpersistence FROM pg_class WHERE oid = %s::regclass",
                      (f"{schema}.points",)).fetchone() == ("u",)  # scratch data: UNLOGGED
    assert pg.execute("SELECT reloptions FROM pg_class WHERE oid = %s::regclass",
                      (f"{schema}.points",)).fetchone() == (["autovacuum_enabled=false"],)
    row = pg.execute(sql.SQL("SELECT point_id, value, category, ST_X(geom), ST_Y(geom) "
                             "FROM {}.points WHERE _row_id = 9500").format(
        sql.Identifier(schema))).fetchone()
    source = points_chunk(9_001, 2_999, with_row_id=False).slice(499, 1).to_pylist()[0]
    point = shapely.from_wkb(source[GEOMETRY])
    assert row == (source["point_id"], source["value"], source["category"], point.x, point.y)
    postgis.index_and_analyze(pg, layer)
    assert _index_methods(pg, schema, "points") == ["btree", "gist"]


def _index_methods(pg, schema: str, table: str) -> list[str]:
    return sorted(r[0] for r in pg.execute(
        "SELECT am.amname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_am am ON am.oid = c.relam WHERE i.indrelid = %s::regclass",
        (f"{schema}.{table}",)).fetchall())


@pytest.mark.parametrize(("primary_key", "indexes"), [(True, ["btree"]), (False, [])])
def test_a_layer_no_join_probes_gets_statistics_but_no_spatial_index(
        pg, schema, postgis_settings, primary_key, indexes):
    layer = create(pg, points_layer(schema))
    with postgis.connect(postgis_settings) as conn:
        postgis.copy_chunk_into_table(conn, layer, points_chunk(0, 1_000), (0, 1_000))
    postgis.index_and_analyze(pg, layer, spatial_index=None, primary_key=primary_key)
    assert _index_methods(pg, schema, "points") == indexes
    analyzed = pg.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass",
                          (f"{schema}.points",)).fetchone()[0]
    assert analyzed == 1_000


def test_a_brin_index_summarises_a_few_pages_per_range(pg, schema, postgis_settings):
    layer = create(pg, points_layer(schema))
    with postgis.connect(postgis_settings) as conn:
        postgis.copy_chunk_into_table(conn, layer, points_chunk(0, 1_000), (0, 1_000))
    postgis.index_and_analyze(pg, layer, spatial_index="brin")
    assert _index_methods(pg, schema, "points") == ["brin", "btree"]
    options = pg.execute(
        "SELECT c.reloptions FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_am am ON am.oid = c.relam WHERE i.indrelid = %s::regclass AND am.amname = "
        "'brin'", (f"{schema}.points",)).fetchone()[0]
    assert options == [f"pages_per_range={postgis.BRIN_PAGES_PER_RANGE}"]


def test_an_unknown_spatial_index_is_refused_before_any_index_is_built(pg, schema):
    layer = create(pg, points_layer(schema))
    with pytest.raises(ValueError, match=r"spatial_index must be one of \('gist', 'brin'\)"):
        postgis.index_and_analyze(pg, layer, spatial_index="rtree")
    assert _index_methods(pg, schema, "points") == []


def test_reloading_a_chunk_replaces_its_rows(pg, schema, postgis_settings):
    layer = create(pg, points_layer(schema))
    with postgis.connect(postgis_settings) as conn:
        postgis.copy_chunk_into_table(conn, layer, points_chunk(0, 1_000), (0, 1_000))
        postgis.copy_chunk_into_table(conn, layer, points_chunk(1_000, 500), (1_000, 1_500))
        postgis.copy_chunk_into_table(conn, layer, points_chunk(0, 1_000), (0, 1_000))
        # a re-run that now keeps fewer rows (a recipe rejected some) leaves none of the old
        postgis.copy_chunk_into_table(conn, layer, points_chunk(1_000, 200), (1_000, 1_500))
    assert ids_and_count(pg, layer) == (1_200, 1_200, 0, 1_199)


# ----------------------------------------------------------------------------- errors


def test_a_polygon_in_a_point_column_names_layer_span_row_and_postgis_message(
        pg, schema, postgis_settings):
    layer = create(pg, points_layer(schema))
    chunk = points_chunk(500, 10)
    geometry = chunk.column(GEOMETRY).to_pylist()
    geometry[3] = shapely.to_wkb(shapely.box(0, 0, 1, 1))
    chunk = chunk.set_column(chunk.schema.get_field_index(GEOMETRY), GEOMETRY,
                             pa.array(geometry, pa.binary()))
    with postgis.connect(postgis_settings) as conn, pytest.raises(LoadError) as error:
        postgis.copy_chunk_into_table(conn, layer, chunk, (500, 510))
    message = str(error.value)
    assert "layer 'points', rows with _row_id 500-509" in message
    assert "at _row_id 503" in message
    assert "Geometry type (Polygon) does not match column type (Point)" in message
    assert "column geom is geometry(Point, 3857), which takes 2D Point geometries only" in message
    assert ids_and_count(pg, layer)[0] == 0  # the chunk's transaction rolled back


def test_ewkb_with_another_srid_is_refused(pg, schema, postgis_settings):
    layer = create(pg, points_layer(schema))
    chunk = points_chunk(0, 3)
    ewkb = shapely.to_wkb(shapely.set_srid(shapely.from_wkb(chunk.column(GEOMETRY)), 4326),
                          include_srid=True)
    chunk = chunk.set_column(chunk.schema.get_field_index(GEOMETRY), GEOMETRY,
                             pa.array(ewkb, pa.binary()))
    with postgis.connect(postgis_settings) as conn, pytest.raises(
            LoadError, match=r"layer 'points', rows with _row_id 0-2: geometry: row 0 is EWKB "
                             r"with SRID 4326 but the column's SRID is 3857"):
        postgis.copy_chunk_into_table(conn, layer, chunk, (0, 3))


def test_row_ids_outside_the_chunks_span_are_refused(schema, pg, postgis_settings):
    layer = create(pg, points_layer(schema))
    with postgis.connect(postgis_settings) as conn, pytest.raises(
            LoadError, match=r"owning _row_id 0-99 holds rows with _row_id 50-149"):
        postgis.copy_chunk_into_table(conn, layer, points_chunk(50, 100), (0, 100))


def test_a_row_id_repeated_inside_a_chunk_is_refused(schema, pg, postgis_settings):
    """What the primary key would catch, caught per chunk before the COPY (a layer only a
    join probes gets no key): ids out of order are fine, a repeated one is not."""
    layer = create(pg, points_layer(schema))
    shuffled = points_chunk(0, 100).take(pa.array(np.random.default_rng(3).permutation(100)))
    with postgis.connect(postgis_settings) as conn:
        assert postgis.copy_chunk_into_table(conn, layer, shuffled, (0, 100)) == 100
        ids = np.arange(100, 200)
        ids[[10, 60, 61]] = [150, 170, 170]
        chunk = points_chunk(100, 100).set_column(0, ROW_ID, pa.array(ids))
        with pytest.raises(LoadError, match=r"owning _row_id 100-199 holds _row_id 150 more than "
                           r"once \(2 id\(s\) repeated\); every row needs an id of its own"):
            postgis.copy_chunk_into_table(conn, layer, chunk, (100, 200))
    assert ids_and_count(pg, layer) == (100, 100, 0, 99)


def test_layers_in_different_srids_cannot_be_joined(pg, schema, postgis_settings):
    mercator = create(pg, points_layer(schema, "points", 3857))
    lonlat = create(pg, points_layer(schema, "countries", 4326))
    load_layer_chunks(postgis_settings, mercator, [((0, 10), lambda: points_chunk(0, 10))])
    load_layer_chunks(postgis_settings, lonlat, [((0, 10), lambda: points_chunk(0, 10))])
    join = SpatialJoin(name="points_per_country", left="points", right="countries")
    with pytest.raises(LoadError, match=r"layer 'points' has SRID 3857 but 'countries' has "
                                        r"4326; both must be in the manifest's target_crs"):
        postgis.run_spatial_join(pg, join, mercator, lonlat)


def test_a_data_error_stops_the_layer_load(pg, schema, postgis_settings):
    layer = create(pg, points_layer(schema))
    bad = points_chunk(100, 100)
    bad = bad.set_column(bad.schema.get_field_index(GEOMETRY), GEOMETRY,
                         pa.array([shapely.to_wkb(shapely.box(0, 0, 1, 1))] * 100, pa.binary()))
    chunks = [((0, 100), lambda: points_chunk(0, 100)), ((100, 200), lambda: bad)]
    with pytest.raises(LoadError, match=r"rows with _row_id 100-199: PostgreSQL rejected"):
        load_layer_chunks(postgis_settings, layer, chunks, parallelism=1, retries=3)


def test_chunks_are_fetched_ahead_in_order_and_at_most_prefetch_ahead(pg, schema, postgis_settings):
    """Fetches run on their own thread, in chunk order, while earlier chunks COPY; at most
    ``prefetch`` fetched tables wait (the load's memory bound), checked from inside each fetch
    against the chunks the loader has taken so far (a chunk is taken once its COPY starts)."""
    layer = create(pg, points_layer(schema))
    spans = [(i * 500, (i + 1) * 500) for i in range(8)]
    fetched: list[int] = []
    fetch_threads: set[str] = set()

    def fetch(index: int) -> pa.Table:  # only the fetch thread calls it, and uses `pg` meanwhile
        fetched.append(index)
        fetch_threads.add(threading.current_thread().name)
        copied = pg.execute(sql.SQL("SELECT count(DISTINCT _row_id / 500) FROM {}.{}").format(
            sql.Identifier(schema), sql.Identifier(layer.table))).fetchone()[0]
        # a fetch starts once the previous table was taken (one slot), that is once the COPY
        # of chunk index - 1 started, so after chunk index - 2 committed
        assert index <= copied + 1, (index, copied)
        time.sleep(0.02)
        return points_chunk(spans[index][0], 500)

    chunks = [(span, lambda i=i: fetch(i)) for i, span in enumerate(spans)]
    assert load_layer_chunks(postgis_settings, layer, chunks, parallelism=1, prefetch=1) == 4_000
    assert fetched == list(range(8))
    assert len(fetch_threads) == 1 and next(iter(fetch_threads)).startswith("fetch-points")
    assert ids_and_count(pg, layer) == (4_000, 4_000, 0, 3_999)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_failing_fetch_fails_the_load_with_its_error_and_leaves_no_thread_behind(
        pg, schema, postgis_settings, prefetch):
    layer = create(pg, points_layer(schema))
    started: list[int] = []

    def fetch(index: int) -> pa.Table:
        started.append(index)
        if index == 2:
            raise LoadError("staging object chunk-2 is missing")
        time.sleep(0.01)
        return points_chunk(index * 100, 100)

    chunks = [((i * 100, (i + 1) * 100), lambda i=i: fetch(i)) for i in range(30)]
    before = set(threading.enumerate())
    with pytest.raises(LoadError, match="chunk-2 is missing"):
        load_layer_chunks(postgis_settings, layer, chunks, parallelism=2, prefetch=prefetch)
    assert set(threading.enumerate()) <= before  # fetcher and workers have ended
    assert 2 in started and len(started) < 30  # the chunks after the failure were not fetched


# ---------------------------------------------------------------------------- retries


def test_a_connection_terminated_mid_copy_is_retried_without_duplicates(
        pg, schema, postgis_settings):
    """pg_terminate_backend from another session while the big chunk is streaming."""
    layer = create(pg, points_layer(schema))
    app = f"load-test-{uuid.uuid4().hex[:8]}"
    settings = dataclasses.replace(postgis_settings, application_name=app)
    big = points_chunk(0, 600_000)
    chunks = [((0, 600_000), lambda: big), ((600_000, 601_000), lambda: points_chunk(600_000, 1_000))]
    killed: list[int] = []
    stop = threading.Event()

    def terminate_the_first_copy() -> None:
        # only the big COPY (past the small chunk's 1,000 rows) and at most halfway through: a
        # backend terminated as its COPY commits has nothing left to retry (a race that once
        # failed CI, when the small chunk's backend was the one terminated)
        with postgis.connect(postgis_settings, autocommit=True) as watcher:
            while not stop.is_set() and not killed:
                pid = watcher.execute(
                    "SELECT a.pid FROM pg_stat_activity a JOIN pg_stat_progress_copy c "
                    "USING (pid) WHERE a.application_name = %s AND a.state = 'active' "
                    "AND a.query ILIKE 'COPY%%' AND a.query LIKE '%%points%%' "
                    "AND c.tuples_processed BETWEEN 1001 AND 300000", (app,)).fetchone()
                if pid and watcher.execute("SELECT pg_terminate_backend(%s)", pid).fetchone()[0]:
                    killed.append(pid[0])
                time.sleep(0.002)

    watcher = threading.Thread(target=terminate_the_first_copy)
    watcher.start()
    done: list[ChunkLoaded] = []
    try:
        rows = load_layer_chunks(settings, layer, chunks, parallelism=2, retries=2,
                                 retry_backoff_seconds=0.05, on_chunk=done.append)
    finally:
        stop.set()
        watcher.join()
    assert killed, "the COPY finished before it could be terminated; use a bigger chunk"
    assert rows == 601_000
    assert ids_and_count(pg, layer) == (601_000, 601_000, 0, 600_999)
    retried = [c for c in done if c.attempts > 1]
    assert len(retried) == 1 and retried[0].attempts == 2
    assert "terminat" in retried[0].retried_errors[0].lower() or \
        "closed" in retried[0].retried_errors[0].lower()


def _timeout_first(timeout_ms: int, times: int):
    """A connection factory whose first ``times`` connections cancel statements after
    ``timeout_ms`` (QueryCanceled, an OperationalError, like a dropped connection)."""
    made = []

    def factory(settings: postgis.PostGISSettings) -> psycopg.Connection:
        conn = postgis.connect(settings)
        if len(made) < times:
            conn.execute(f"SET statement_timeout = {timeout_ms}")
            conn.commit()
        made.append(conn)
        return conn

    return factory


def test_a_statement_timeout_on_the_first_attempt_is_retried(pg, schema, postgis_settings):
    layer = create(pg, points_layer(schema))
    big = points_chunk(0, 300_000)
    done: list[ChunkLoaded] = []
    rows = load_layer_chunks(postgis_settings, layer, [((0, 300_000), lambda: big)],
                             parallelism=1, retries=1, retry_backoff_seconds=0.01,
                             on_chunk=done.append, connection_factory=_timeout_first(1, 1))
    assert rows == 300_000
    assert ids_and_count(pg, layer) == (300_000, 300_000, 0, 299_999)
    assert done[0].attempts == 2 and "QueryCanceled" in done[0].retried_errors[0]


def test_exhausted_retries_raise_a_load_error(pg, schema, postgis_settings):
    layer = create(pg, points_layer(schema))
    big = points_chunk(0, 300_000)
    with pytest.raises(LoadError, match=r"layer 'points', rows with _row_id 0-299999: the "
                                        r"connection failed on all 2 attempts; last error: "
                                        r"QueryCanceled"):
        load_layer_chunks(postgis_settings, layer, [((0, 300_000), lambda: big)],
                          parallelism=1, retries=1, retry_backoff_seconds=0.01,
                          connection_factory=_timeout_first(1, 5))
    assert ids_and_count(pg, layer)[0] == 0


def test_a_refused_connection_is_retried(pg, schema, postgis_settings):
    layer = create(pg, points_layer(schema))
    calls = []

    def refuse_once(settings: postgis.PostGISSettings) -> psycopg.Connection:
        calls.append(1)
        if len(calls) == 1:
            raise psycopg.OperationalError("connection refused (simulated restart)")
        return postgis.connect(settings)

    done: list[ChunkLoaded] = []
    load_layer_chunks(postgis_settings, layer, [((0, 10), lambda: points_chunk(0, 10))],
                      retry_backoff_seconds=0.01, on_chunk=done.append,
                      connection_factory=refuse_once)
    assert ids_and_count(pg, layer) == (10, 10, 0, 9)
    assert done[0].retried_errors == ("OperationalError: connection refused (simulated restart)",)


def test_loading_the_same_chunks_again_replaces_them(pg, schema, postgis_settings):
    """A first load into an empty table skips the per-chunk DELETE; a second load into the
    now full table must not: it replaces every chunk's span."""
    layer = create(pg, points_layer(schema))
    chunks = [((a, a + 1_000), lambda a=a: points_chunk(a, 1_000)) for a in range(0, 5_000, 1_000)]
    load_layer_chunks(postgis_settings, layer, chunks)
    load_layer_chunks(postgis_settings, layer, chunks[1:3])
    assert ids_and_count(pg, layer) == (5_000, 5_000, 0, 4_999)


def test_overlapping_spans_are_refused_before_loading(postgis_settings):
    layer = points_layer("etl_run_" + "0" * 32)
    with pytest.raises(LoadError, match=r"spans 0-99 and 50-149 overlap"):
        load_layer_chunks(postgis_settings, layer, [((0, 100), lambda: None),
                                                    ((50, 150), lambda: None)])
