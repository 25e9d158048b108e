"""Running a spatial join inside a run schema: the index each layer needs, the result table,
and the reconciliation of its rows against the left layer.

The queries are composed in ``libs.postgis.join_sql``; why they have the shape they have is
in docs/postgis-join.md. Every join runs with ``jit = off``: JIT spends a few hundred
milliseconds compiling a plan whose time is all in PostGIS functions it cannot inline.
"""

from __future__ import annotations

import hashlib
import logging

import psycopg
from psycopg import sql

from libs.errors import LoadError, ReconciliationError
from libs.manifest import SpatialJoin
from libs.postgis.connection import GEOM, ROW_ID
from libs.postgis.join_sql import (
    LEFT_ROW_ID,
    PREDICATE_FUNCTIONS,
    helper_table_name,
    join_output_schema,
    measures_on_ellipsoid,
    spatial_join_query,
    subdivided_query,
    subdivides,
)
from libs.postgis.tables import LayerTable

log = logging.getLogger(__name__)

def spatial_index_for(join: SpatialJoin, layer: str, geometry_type: str) -> str | None:
    """The spatial index the join needs on ``layer`` (see ``libs.postgis.tables.index_and_analyze``).

    Only the right layer is probed: the left one is scanned, whole (the ``LATERAL`` query) or
    as its parts (``subdivides``), so it gets none. A right point layer
    that only bbox operators probe (intersects, contains, within) gets ``brin``, for which its
    chunks must be COPYed one after another in chunk order (``load_layer_chunks`` with
    ``parallelism=1``), so that the heap keeps the shard's Hilbert order: 10M
    points index in ~1.5 s instead of ~12 s for GiST, and the join takes the same time. Any
    other right layer (lines and polygons widen the summaries; dwithin and nearest rank or
    expand) gets ``gist``.
    """
    if layer != join.right:
        return None
    if join.predicate in PREDICATE_FUNCTIONS and geometry_type.rstrip("ZM") == "Point":
        return "brin"
    return "gist"


def _build_pieces(conn: psycopg.Connection, left: LayerTable, pieces: sql.Composed,
                  seams: sql.Composed) -> None:
    """The left rows' parts (``ST_Dump``: ``_lid``, ``_pid``, ``geom``, no index) and the
    seams where two parts of one left row touch (``_lid``, ``box``, padded for rounding)."""
    g = sql.Identifier(GEOM)
    conn.execute(sql.SQL(
        "CREATE UNLOGGED TABLE {pieces} AS SELECT _lid, row_number() OVER () AS _pid, {g} FROM "
        "(SELECT {rid} AS _lid, (ST_Dump({g})).geom AS {g} FROM {left}) s").format(
        pieces=pieces, g=g, rid=sql.Identifier(ROW_ID), left=left.qualified))
    # the table is a few hundred rows, below min_parallel_table_scan_size: without this
    # PostgreSQL would probe every piece from one process
    workers = int(conn.execute("SHOW max_parallel_workers_per_gather").fetchone()[0])
    conn.execute(sql.SQL("ALTER TABLE {} SET (parallel_workers = {})").format(
        pieces, sql.Literal(max(workers, 0))))
    conn.execute(sql.SQL("ANALYZE {}").format(pieces))
    # a right point where two parts of one left row touch intersects both; ST_Intersection of
    # two parts is where they touch, padded by far more than its rounding error
    conn.execute(sql.SQL(
        "CREATE UNLOGGED TABLE {seams} AS SELECT _lid, ST_Expand(box2d((ST_Dump(seam)).geom), "
        "1e-9 * (1 + greatest(abs(ST_XMin(seam)), abs(ST_XMax(seam)), abs(ST_YMin(seam)), "
        "abs(ST_YMax(seam)))))::geometry AS box FROM (SELECT p._lid, ST_Intersection(p.{g}, q.{g}) "
        "AS seam FROM {pieces} p JOIN {pieces} q ON p._lid = q._lid AND p._pid < q._pid "
        "AND p.{g} && q.{g}) s").format(seams=seams, pieces=pieces, g=g))
    # a handful of rows: without statistics the planner guesses ~1,000 and may scan the
    # whole right layer once per seam instead of probing its index
    conn.execute(sql.SQL("ANALYZE {}").format(seams))


def _index_as_geography(conn: psycopg.Connection, layer: LayerTable) -> None:
    """An expression GiST index on ``(geom::geography)``: what geography KNN and ST_DWithin use."""
    digest = hashlib.sha256(f"{layer.schema}.{layer.table}".encode()).hexdigest()[:8]
    name = f"{layer.table[:40]}_{digest}_geog"
    with conn.transaction():
        conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING gist (({}::geography))").format(
            sql.Identifier(name), layer.qualified, sql.Identifier(GEOM)))
        conn.execute(sql.SQL("ANALYZE {}").format(layer.qualified))


def run_spatial_join(
    conn: psycopg.Connection, join: SpatialJoin, left: LayerTable, right: LayerTable
) -> LayerTable:
    """Materialise ``join`` as a table in the run schema (see the module docstring for its
    shape); its ``attributes`` are what :func:`stream_table` yields besides the geometry."""
    if left.srid != right.srid:
        raise LoadError(
            f"join {join.name!r}: layer {join.left!r} has SRID {left.srid} but {join.right!r} has "
            f"{right.srid}; both must be in the manifest's target_crs"
        )
    out_schema = join_output_schema(join, left, right)
    query = spatial_join_query(join, left, right)
    if measures_on_ellipsoid(join, left.srid):
        _index_as_geography(conn, right)
    result = LayerTable(left.schema, join.name, out_schema, left.srid)
    target = result.qualified
    with conn.transaction():
        # JIT compiles the whole plan for a few hundred milliseconds and pays nothing back:
        # the time goes into PostGIS functions, which JIT cannot inline
        conn.execute("SET LOCAL jit = off")
        subdivided = subdivided_query_or_none(conn, join, left, right) \
            if subdivides(join, left, right) else None
        conn.execute(sql.SQL("CREATE TABLE {} AS {}").format(target, subdivided or query))
        conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
            target, sql.Identifier(ROW_ID)))
        if subdivided is not None:
            for what in ("pieces", "seams"):
                conn.execute(sql.SQL("DROP TABLE {}").format(helper_table_name(join, left, what)))
    return result


def subdivided_query_or_none(conn: psycopg.Connection, join: SpatialJoin, left: LayerTable,
                        right: LayerTable) -> sql.Composed | None:
    """Build the parts and return the part-by-part query; None (the plain LATERAL query is
    used) when GEOS fails on a left geometry, e.g. an invalid polygon."""
    pieces, seams = helper_table_name(join, left, "pieces"), helper_table_name(join, left, "seams")
    try:
        with conn.transaction():
            _build_pieces(conn, left, pieces, seams)
    except psycopg.errors.InternalError_ as exc:
        log.warning("join %r: cannot split layer %r into parts (%s); joining its rows whole",
                    join.name, join.left, str(exc).strip())
        return None
    return subdivided_query(join, left, right, pieces, seams)


def reconcile_join(conn: psycopg.Connection, join: SpatialJoin, left: LayerTable,
                   result: LayerTable, streamed_rows: int) -> None:
    """Check the result against its left layer and what was streamed out of it: every row
    streamed; a left join keeps every left row (an aggregating join exactly once); no left row
    has more than ``k`` nearest matches."""
    left_id = sql.Identifier(ROW_ID if join.carry is None else LEFT_ROW_ID)
    # one hash aggregate over the left ids, not a window sorting the whole result
    rows, left_rows_kept, most = conn.execute(sql.SQL(
        "SELECT coalesce(sum(n), 0), count(*), coalesce(max(n), 0) FROM "
        "(SELECT count(*) AS n FROM {t} GROUP BY {id}) c").format(
        id=left_id, t=result.qualified)).fetchone()
    left_rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(left.qualified)).fetchone()[0]
    problems = []
    if streamed_rows != rows:
        problems.append(f"{rows} result rows but {streamed_rows} streamed out")
    if join.how == "left" and left_rows_kept != left_rows:
        problems.append(f"a left join must keep all {left_rows} left rows, kept {left_rows_kept}")
    if join.carry is None and rows != left_rows_kept:
        problems.append(f"an aggregating join gives one row per left row, got {rows} rows for "
                        f"{left_rows_kept} left rows")
    if join.predicate == "nearest" and most > join.k:
        problems.append(f"a left row has {most} nearest matches, more than k={join.k}")
    if problems:
        raise ReconciliationError(f"join {join.name!r}: " + "; ".join(problems))

