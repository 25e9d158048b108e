"""Spatial joins inside a run schema, and streaming their results back out without fetchall.

A join (``libs.manifest.SpatialJoin``) matches right rows to each left row in a ``LATERAL``
subquery, so the right layer's GiST index is probed once per left row:

* ``intersects`` / ``contains`` / ``within``: ``WHERE ST_<predicate>(l.geom, r.geom)``.
* ``dwithin``: ``WHERE ST_DWithin(l.geom, r.geom, distance)``; in a geographic CRS both sides
  are cast to ``geography`` (metres on the ellipsoid) and an expression GiST index on
  ``(geom::geography)`` is built on the right table first. A projected CRS must be in metres.
* ``nearest``: the ``k`` right rows nearest to the left row (optionally only those within
  ``max_distance``), in two index probes. First ``ORDER BY r.geom <-> l.geom LIMIT k``: the KNN
  operator walks the GiST index and the farthest of these k candidates gives a radius that holds
  at least k rows. Then ``WHERE ST_DWithin(r.geom, l.geom, radius) ORDER BY distance, r._row_id
  LIMIT k`` ranks the rows within it exactly. Why not one ``ORDER BY <->, _row_id``: a second
  sort key stops PostgreSQL from walking the index in KNN order (it scans and sorts the whole
  table per left row), and PostGIS ranks ``geography`` KNN on the sphere whereas distances are
  reported on the ellipsoid. So exactly ``k`` rows per left row, ranked by the reported distance;
  ties at the k-th distance go to the right row loaded first (lowest ``_row_id``), where
  geopandas' ``sjoin_nearest`` returns every tied row.

Two result shapes, both materialised as a table in the run schema:

* aggregating (``aggregations``): ``SELECT l.*, a.* FROM left l CROSS JOIN LATERAL (SELECT
  count(*), sum(r.c)… FROM <matches> r) a`` (``inner``: ``WHERE`` a match count ``> 0``): one
  row per left row, ``_row_id`` = the left row's.
* carrying (``carry``): ``FROM left l [LEFT] JOIN LATERAL (<matches>) m ON true``: one row per
  (left, right) pair with the carried columns and, for dwithin/nearest, the distance;
  ``_row_id`` numbers the rows in (left ``_row_id``, distance, right ``_row_id``) order, and
  ``_left_row_id`` / ``_right_row_id`` (never streamed) say which pair a row is.

An aggregating ``intersects`` of polygonal left rows with right points (the sample batch's
points per country) runs part by part instead (``subdivides``): the left geometries are split
into their parts (``ST_Dump``) in an UNLOGGED helper table, and
``SELECT count(*), sum(..), count(..) FROM parts p JOIN right r ON ST_Intersects(p.geom, r.geom)
GROUP BY p._lid`` is aggregated per left row. Why: the parts table is a regular table with a
``parallel_workers`` reloption, so PostgreSQL runs that join as a Parallel Seq Scan over the parts,
each probing the right layer's index, with partial aggregates per worker (a LATERAL over a
177-row left table always runs in one process, and a temp table cannot be scanned by workers);
and each part's bbox is tighter than its multipolygon's. A point where two parts of one left
row touch intersects both: the "seams" (``ST_Intersection`` of touching parts, padded) find
those few points, and their repeats are subtracted from count, sums and non-null counts. The
parts are exactly the left geometry's coordinates, so results equal the whole-row join.
``ST_Subdivide`` (≤ 64 vertices a piece) was measured about 25 % faster still, but is not
exact: a vertex it creates where a cut meets the outline is rounded, and a point there
matched a piece but not the polygon (``sjoin`` agrees with the polygon). The parts get no
spatial index on purpose: with one, PostgreSQL may instead scan every right point and probe the
parts (it costs a BRIN probe of the right layer far above what it takes, having no correlation
statistics for geometries), 20x slower on 1M points. If GEOS fails on a
left geometry the plain LATERAL query runs. Every join runs with ``jit = off``: JIT spent
~0.3 s compiling a plan whose time is all in PostGIS functions it cannot inline.

``stream_table`` reads the result in ``_row_id`` order as Arrow (ADBC: binary COPY decoded in C);
``export_table`` writes what it yields to the staging bucket as GeoParquet parts, one per batch,
ready for ``libs.lake.publish_to_lake``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator

import adbc_driver_postgresql.dbapi as adbc_postgresql
import psycopg
import pyarrow as pa
from adbc_driver_postgresql import StatementOptions
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.pq import TransactionStatus
from pyproj import CRS
from pyproj.exceptions import CRSError

from libs.errors import LoadError, ReconciliationError
from libs.geoparquet import GEOMETRY, encode_wkb_table
from libs.lake import StagedPart
from libs.manifest import SpatialJoin, distance_unit_problem
from libs.object_store import BackgroundPuts, ObjectStore
from libs.postgis import GEOM, ROW_ID
from libs.postgis_load import LayerTable

log = logging.getLogger(__name__)

_PREDICATES = {"intersects": "ST_Intersects", "contains": "ST_Contains", "within": "ST_Within"}
#: Internal columns of a carrying join's result table (never streamed out).
LEFT_ROW_ID = "_left_row_id"
RIGHT_ROW_ID = "_right_row_id"
_DISTANCE = "_distance"
_MATCHES = "_matches"
_RESERVED = frozenset({ROW_ID, GEOM, LEFT_ROW_ID, RIGHT_ROW_ID, _DISTANCE, _MATCHES})


def _numeric(field: pa.Field) -> bool:
    return pa.types.is_integer(field.type) or pa.types.is_floating(field.type) or \
        pa.types.is_decimal(field.type)


def _qualified(layer: LayerTable) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(layer.schema), sql.Identifier(layer.table))


def _right_column(join: SpatialJoin, right: LayerTable, column: str, use: str) -> pa.Field:
    if column not in right.attributes.names:
        raise LoadError(
            f"join {join.name!r}: {use} column {column!r} does not exist in layer "
            f"{join.right!r}; expected one of {right.attributes.names}"
        )
    return right.attributes.field(column)


def _new_column(join: SpatialJoin, left: LayerTable, name: str, what: str) -> None:
    if name in left.attributes.names:
        raise LoadError(
            f"join {join.name!r}: {what} {name!r} clashes with a column of layer {join.left!r}; "
            "choose another output name"
        )
    if name in _RESERVED:
        raise LoadError(
            f"join {join.name!r}: {what} {name!r} is reserved for the join's own columns "
            f"({sorted(_RESERVED)}); choose another output name"
        )


def join_output_schema(join: SpatialJoin, left: LayerTable, right: LayerTable) -> pa.Schema:
    """Check the join against the loaded layers and return the result's attribute schema:
    the left columns, then the aggregates, or the carried columns (and the distance)."""
    fields = list(left.attributes)
    if join.carry is not None:
        for name in set(left.attributes.names) & {LEFT_ROW_ID, RIGHT_ROW_ID}:
            raise LoadError(f"join {join.name!r}: column {name!r} of layer {join.left!r} is "
                            "reserved for the join's own columns; rename it in the layer's recipe")
        for column, output in join.carried_columns():
            field = _right_column(join, right, column, "carried")
            _new_column(join, left, output, "carried column output")
            fields.append(pa.field(output, field.type))
        if join.measures_distance:
            _new_column(join, left, join.distance_column, "distance_column")
            fields.append(pa.field(join.distance_column, pa.float64()))
        return pa.schema(fields)
    if join.measures_distance and _DISTANCE in right.attributes.names:
        # the matches subquery selects r.* next to its own _distance
        raise LoadError(f"join {join.name!r}: column {_DISTANCE!r} of layer {join.right!r} is "
                        "reserved for the join's own columns; rename it in the layer's recipe")
    for agg in join.aggregations:
        _new_column(join, left, agg.output, "aggregation output")
        if agg.function == "count":
            fields.append(pa.field(agg.output, pa.int64()))
            continue
        field = _right_column(join, right, agg.column, agg.function)
        if not _numeric(field):
            raise LoadError(
                f"join {join.name!r}: {agg.function} needs a numeric column but {agg.column!r} of "
                f"layer {join.right!r} is {field.type}; choose one of "
                f"{[f.name for f in right.attributes if _numeric(f)]}"
            )
        fields.append(pa.field(agg.output, pa.float64()))
    return pa.schema(fields)


def measures_on_ellipsoid(join: SpatialJoin, srid: int) -> bool:
    """Whether the join's distances are geodesic (geography); raises when the SRID's CRS cannot
    measure metres. False for the predicates that measure nothing."""
    if not join.measures_distance:
        return False
    try:
        crs = CRS.from_epsg(srid)
    except CRSError:
        raise LoadError(f"join {join.name!r}: SRID {srid} is not an EPSG code pyproj knows, so "
                        f"the unit of its {join.predicate!r} distances is unknown") from None
    problem = distance_unit_problem(crs)
    if problem:
        raise LoadError(f"join {join.name!r}: {join.predicate!r} measures distances in metres, "
                        f"but the layers' CRS EPSG:{srid} {problem}")
    return crs.is_geographic


def _matches(join: SpatialJoin, right: LayerTable, geography: bool,
             columns: sql.Composable) -> sql.Composed:
    """The right rows matching left row ``l`` (``columns`` of ``r``; ``_distance`` for the
    distance predicates), in match order for ``nearest``."""
    table = _qualified(right)
    rid = sql.Identifier(ROW_ID)
    if join.predicate in _PREDICATES:
        return sql.SQL("SELECT {cols} FROM {table} r WHERE {pred}(l.{g}, r.{g})").format(
            cols=columns, table=table, pred=sql.SQL(_PREDICATES[join.predicate]),
            g=sql.Identifier(GEOM))
    cast = sql.SQL("::geography") if geography else sql.SQL("")
    fmt = {"g": sql.Identifier(GEOM), "cast": cast, "table": table, "cols": columns, "rid": rid,
           "dist": sql.Identifier(_DISTANCE)}
    lg = sql.SQL("(l.{g}{cast})").format(**fmt)
    rg = sql.SQL("(r.{g}{cast})").format(**fmt)
    fmt |= {"lg": lg, "rg": rg}
    if join.predicate == "dwithin":
        return sql.SQL(
            "SELECT {cols}, ST_Distance({lg}, {rg}) AS {dist} FROM {table} r "
            "WHERE ST_DWithin({rg}, {lg}, {d})").format(**fmt, d=sql.Literal(join.distance))
    within_max = sql.SQL("")
    also_max = sql.SQL("")
    if join.max_distance is not None:
        m = sql.Literal(join.max_distance)
        within_max = sql.SQL("WHERE ST_DWithin({rg}, {lg}, {m})").format(**fmt, m=m)
        also_max = sql.SQL("AND ST_DWithin({rg}, {lg}, {m})").format(**fmt, m=m)
    k = sql.Literal(join.k)
    # KNN through the GiST index finds k candidates; the farthest of them (padded against
    # rounding) is a radius holding at least k rows, which are then ranked exactly
    radius = sql.SQL(
        "(SELECT max(ST_Distance({lg}, {rg})) * (1 + 1e-9) + 1e-6 FROM (SELECT r.{g} FROM "
        "{table} r {within_max} ORDER BY {rg} <-> {lg} LIMIT {k}) r)").format(
        **fmt, within_max=within_max, k=k)
    return sql.SQL(
        "SELECT {cols}, ST_Distance({lg}, {rg}) AS {dist} FROM {table} r "
        "WHERE ST_DWithin({rg}, {lg}, {radius}) {also_max} ORDER BY {dist}, r.{rid} LIMIT {k}"
    ).format(**fmt, radius=radius, also_max=also_max, k=k)


def spatial_join_query(join: SpatialJoin, left: LayerTable, right: LayerTable) -> sql.Composed:
    """The ``SELECT`` computing the join's result rows (see the module docstring)."""
    geography = measures_on_ellipsoid(join, left.srid)
    left_table = _qualified(left)
    if join.carry is None:
        aggregates = []
        for agg in join.aggregations:
            if agg.function == "count":
                expr = sql.SQL("count(*)")
            else:
                fn = sql.SQL("sum") if agg.function == "sum" else sql.SQL("avg")
                expr = sql.SQL("{}(r.{})::double precision").format(fn, sql.Identifier(agg.column))
            aggregates.append(sql.SQL("{} AS {}").format(expr, sql.Identifier(agg.output)))
        # an extra count decides membership without depending on the user's aggregates
        aggregates.append(sql.SQL("count(*) AS {}").format(sql.Identifier(_MATCHES)))
        where = sql.SQL("WHERE a.{} > 0").format(sql.Identifier(_MATCHES)) \
            if join.how == "inner" else sql.SQL("")
        return sql.SQL(
            "SELECT l.*, {agg_cols} FROM {left} l CROSS JOIN LATERAL "
            "(SELECT {aggs} FROM ({matches}) r) a {where}"
        ).format(
            agg_cols=sql.SQL(", ").join(sql.SQL("a.{}").format(sql.Identifier(a.output))
                                        for a in join.aggregations),
            left=left_table,
            aggs=sql.SQL(", ").join(aggregates),
            matches=_matches(join, right, geography, sql.SQL("r.*")),
            where=where,
        )
    carried = join.carried_columns()
    inner_cols = [sql.SQL("r.{} AS {}").format(sql.Identifier(ROW_ID), sql.Identifier(RIGHT_ROW_ID))]
    inner_cols += [sql.SQL("r.{} AS {}").format(sql.Identifier(c), sql.Identifier(o))
                   for c, o in carried]
    order = [sql.SQL("l.{}").format(sql.Identifier(ROW_ID))]
    outer_cols = [sql.SQL("l.{} AS {}").format(sql.Identifier(ROW_ID), sql.Identifier(LEFT_ROW_ID)),
                  sql.SQL("m.{}").format(sql.Identifier(RIGHT_ROW_ID))]
    outer_cols += [sql.SQL("l.{}").format(sql.Identifier(n)) for n in left.attributes.names]
    outer_cols += [sql.SQL("m.{}").format(sql.Identifier(o)) for _, o in carried]
    if join.measures_distance:
        order.append(sql.SQL("m.{}").format(sql.Identifier(_DISTANCE)))
        outer_cols.append(sql.SQL("m.{} AS {}").format(sql.Identifier(_DISTANCE),
                                                      sql.Identifier(join.distance_column)))
    order.append(sql.SQL("m.{}").format(sql.Identifier(RIGHT_ROW_ID)))
    outer_cols.append(sql.SQL("l.{}").format(sql.Identifier(GEOM)))
    return sql.SQL(
        "SELECT (row_number() OVER (ORDER BY {order}) - 1) AS {row_id}, {cols} "
        "FROM {left} l {kind} JOIN LATERAL ({matches}) m ON true"
    ).format(
        order=sql.SQL(", ").join(order),
        row_id=sql.Identifier(ROW_ID),
        cols=sql.SQL(", ").join(outer_cols),
        left=left_table,
        kind=sql.SQL("LEFT") if join.how == "left" else sql.SQL(""),
        matches=_matches(join, right, geography, sql.SQL(", ").join(inner_cols)),
    )


_SUBDIVIDABLE = frozenset({"Polygon", "MultiPolygon", "Geometry"})


def spatial_index_for(join: SpatialJoin, layer: str, geometry_type: str) -> str | None:
    """The spatial index the join needs on ``layer`` (see ``postgis_load.index_and_analyze``).

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
    if join.predicate in _PREDICATES and geometry_type == "Point":
        return "brin"
    return "gist"


def subdivides(join: SpatialJoin, left: LayerTable, right: LayerTable) -> bool:
    """Whether the join runs part by part over the left geometries (see the module docstring):
    an aggregating ``intersects`` of polygonal left rows with right points."""
    return (join.predicate == "intersects" and join.carry is None
            and left.geometry_type in _SUBDIVIDABLE and right.geometry_type == "Point")


def _helper_name(join: SpatialJoin, left: LayerTable, what: str) -> sql.Composed:
    digest = hashlib.sha256(f"{left.schema}.{join.name}".encode()).hexdigest()[:8]
    return sql.SQL("{}.{}").format(sql.Identifier(left.schema),
                                   sql.Identifier(f"{join.name[:40]}_{digest}_{what}"))


def _build_pieces(conn: psycopg.Connection, left: LayerTable, pieces: sql.Composed,
                  seams: sql.Composed) -> None:
    """The left rows' parts (``ST_Dump``: ``_lid``, ``_pid``, ``geom``, no index) and the
    seams where two parts of one left row touch (``_lid``, ``box``, padded for rounding)."""
    g = sql.Identifier(GEOM)
    conn.execute(sql.SQL(
        "CREATE UNLOGGED TABLE {pieces} AS SELECT _lid, row_number() OVER () AS _pid, {g} FROM "
        "(SELECT {rid} AS _lid, (ST_Dump({g})).geom AS {g} FROM {left}) s").format(
        pieces=pieces, g=g, rid=sql.Identifier(ROW_ID), left=_qualified(left)))
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


def _subdivided_query(join: SpatialJoin, left: LayerTable, right: LayerTable,
                      pieces: sql.Composed, seams: sql.Composed) -> sql.Composed:
    """The aggregating ``intersects`` join over ``_build_pieces``' pieces: partial aggregates
    per left row over (piece, point) matches, minus the repeats of points on seams."""
    g = sql.Identifier(GEOM)
    rid = sql.Identifier(ROW_ID)
    right_table = _qualified(right)
    columns = []  # (partial alias, expression over r) per aggregated right column
    for i, agg in enumerate(join.aggregations):
        if agg.function == "count":
            continue
        column = sql.SQL("r.{}").format(sql.Identifier(agg.column))
        if agg.function == "mean":
            # avg() accumulates integers as numeric and floats as double precision
            floating = pa.types.is_floating(right.attributes.field(agg.column).type)
            column = sql.SQL("{}::{}").format(column, sql.SQL(
                "double precision" if floating else "numeric"))
        columns.append((i, column))
    partials = [sql.SQL("count(*) AS _n")]
    for i, column in columns:
        partials += [sql.SQL("sum({}) AS {}").format(column, sql.Identifier(f"_s{i}")),
                     sql.SQL("count({}) AS {}").format(column, sql.Identifier(f"_c{i}"))]
    carried = [sql.SQL("{} AS {}").format(column, sql.Identifier(f"_v{i}")) for i, column in columns]
    repeats = [sql.SQL("count(*) AS _n")]
    for i, _ in columns:
        v = sql.Identifier(f"_v{i}")
        repeats += [sql.SQL("sum({}) AS {}").format(v, sql.Identifier(f"_s{i}")),
                    sql.SQL("count({}) AS {}").format(v, sql.Identifier(f"_c{i}"))]
    count = sql.SQL("(coalesce(a._n, 0) - coalesce(d._n, 0))")
    outputs = []
    for i, agg in enumerate(join.aggregations):
        name = sql.Identifier(agg.output)
        if agg.function == "count":
            outputs.append(sql.SQL("{} AS {}").format(count, name))
            continue
        s, c = sql.Identifier(f"_s{i}"), sql.Identifier(f"_c{i}")
        fmt = {"s": s, "c": c, "name": name}
        total = sql.SQL("(a.{s} - coalesce(d.{s}, 0))").format(**fmt)
        kept = sql.SQL("(coalesce(a.{c}, 0) - coalesce(d.{c}, 0))").format(**fmt)
        value = total if agg.function == "sum" else sql.SQL("{} / {}").format(total, kept)
        outputs.append(sql.SQL("CASE WHEN {kept} > 0 THEN ({value})::double precision END AS {name}")
                       .format(kept=kept, value=value, name=name))
    where = sql.SQL("WHERE {} > 0").format(count) if join.how == "inner" else sql.SQL("")
    fmt = {"g": g, "rid": rid, "pieces": pieces, "seams": seams, "right": right_table,
           "carried": sql.SQL("").join(sql.SQL(", ") + c for c in carried)}
    matches = sql.SQL(
        "SELECT p._lid, {partials} FROM {pieces} p JOIN {right} r ON ST_Intersects(p.{g}, r.{g}) "
        "GROUP BY p._lid").format(partials=sql.SQL(", ").join(partials), **fmt)
    # every (left row, seam point) with one row per piece it intersects; all but the first
    # are repeats
    near_seams = sql.SQL(
        "SELECT DISTINCT ON (s._lid, r.{rid}) s._lid, r.{rid} AS _rid, r.{g}{carried} "
        "FROM {seams} s JOIN {right} r ON r.{g} && s.box").format(**fmt)
    extra = sql.SQL(
        "SELECT _lid, {repeats} FROM (SELECT m.*, row_number() OVER (PARTITION BY m._lid, m._rid) "
        "AS _nth FROM ({near_seams}) m JOIN {pieces} q ON q._lid = m._lid AND q.{g} && m.{g} "
        "AND ST_Intersects(q.{g}, m.{g})) x WHERE _nth > 1 GROUP BY _lid").format(
        repeats=sql.SQL(", ").join(repeats), near_seams=near_seams, **fmt)
    return sql.SQL(
        "SELECT l.*, {outputs} FROM {left} l LEFT JOIN ({matches}) a ON a._lid = l.{rid} "
        "LEFT JOIN ({extra}) d ON d._lid = l.{rid} {where}").format(
        outputs=sql.SQL(", ").join(outputs), left=_qualified(left), matches=matches,
        extra=extra, where=where, rid=rid)


def _index_as_geography(conn: psycopg.Connection, layer: LayerTable) -> None:
    """An expression GiST index on ``(geom::geography)``: what geography KNN and ST_DWithin use."""
    digest = hashlib.sha256(f"{layer.schema}.{layer.table}".encode()).hexdigest()[:8]
    name = f"{layer.table[:40]}_{digest}_geog"
    with conn.transaction():
        conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING gist (({}::geography))").format(
            sql.Identifier(name), _qualified(layer), sql.Identifier(GEOM)))
        conn.execute(sql.SQL("ANALYZE {}").format(_qualified(layer)))


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
    target = _qualified(result)
    with conn.transaction():
        # JIT compiles the whole plan for a few hundred milliseconds and pays nothing back:
        # the time goes into PostGIS functions, which JIT cannot inline
        conn.execute("SET LOCAL jit = off")
        subdivided = _subdivided_or_none(conn, join, left, right) \
            if subdivides(join, left, right) else None
        conn.execute(sql.SQL("CREATE TABLE {} AS {}").format(target, subdivided or query))
        conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
            target, sql.Identifier(ROW_ID)))
        if subdivided is not None:
            for what in ("pieces", "seams"):
                conn.execute(sql.SQL("DROP TABLE {}").format(_helper_name(join, left, what)))
    return result


def _subdivided_or_none(conn: psycopg.Connection, join: SpatialJoin, left: LayerTable,
                        right: LayerTable) -> sql.Composed | None:
    """Build the parts and return the part-by-part query; None (the plain LATERAL query is
    used) when GEOS fails on a left geometry, e.g. an invalid polygon."""
    pieces, seams = _helper_name(join, left, "pieces"), _helper_name(join, left, "seams")
    try:
        with conn.transaction():
            _build_pieces(conn, left, pieces, seams)
    except psycopg.errors.InternalError_ as exc:
        log.warning("join %r: cannot split layer %r into parts (%s); joining its rows whole",
                    join.name, join.left, str(exc).strip())
        return None
    return _subdivided_query(join, left, right, pieces, seams)


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
        id=left_id, t=_qualified(result))).fetchone()
    left_rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(_qualified(left))).fetchone()[0]
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


#: What the ADBC reader fills before it yields a batch (a hint: it stops at the row that
#: crosses it). About 250k points with a few attributes; memory holds one such batch.
STREAM_BATCH_BYTES = 16 << 20
#: libpq settings of a psycopg connection that the export's own connection copies.
_CONNINFO_KEYS = ("host", "hostaddr", "port", "user", "dbname", "options", "application_name",
                  "sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout")


def _conninfo_of(conn: psycopg.Connection) -> str:
    """A libpq connection string for a second connection as ``conn`` is (password included)."""
    params = {k: v for k, v in conn.info.get_parameters().items() if k in _CONNINFO_KEYS}
    if conn.info.password:
        params["password"] = conn.info.password
    return make_conninfo(**params)


def _conform(column: pa.Array, field: pa.Field, layer: LayerTable) -> pa.Array:
    """ADBC's Arrow type for a column, cast to the type the layer was loaded from."""
    if isinstance(column.type, pa.ExtensionType):  # numeric arrives as opaque text
        column = column.storage
    if column.type == field.type:
        return column
    try:
        return column.cast(field.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise LoadError(
            f"{layer.schema}.{layer.table}: column {field.name!r} came out of PostgreSQL as "
            f"{column.type}, which does not cast to the loaded type {field.type}: {exc}") from exc


def stream_table(
    conn: psycopg.Connection, layer: LayerTable, batch_rows: int = 250_000
) -> Iterator[pa.Table]:
    """Yield the table in ``_row_id`` order as Arrow tables of at most ``batch_rows`` rows: the
    attributes as ``layer.attributes`` types them, then ``geometry`` as ISO WKB.

    Read with ADBC's PostgreSQL driver: ``COPY (SELECT …) TO STDOUT (FORMAT BINARY)`` decoded
    into Arrow in C, about 3x what a binary server-side cursor gives once Python has built its
    row tuples and Arrow its arrays from them (1M points: 0.42 s against 1.45 s). It runs on a
    connection of its own, opened with ``conn``'s settings, so it sees committed rows only:
    ``conn`` must have no open transaction. Memory holds one reader batch
    (``STREAM_BATCH_BYTES``), never the whole result."""
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise LoadError(
            f"stream_table({layer.schema}.{layer.table}): the connection has an open transaction "
            f"({conn.info.transaction_status.name}); commit first: the table is read on a "
            "connection of its own, which sees committed rows only")
    names = layer.attributes.names
    select = sql.SQL("SELECT {}ST_AsBinary({}) FROM {} ORDER BY {}").format(
        sql.SQL("").join(sql.SQL("{}, ").format(sql.Identifier(n)) for n in names),
        sql.Identifier(GEOM), _qualified(layer), sql.Identifier(ROW_ID)).as_string(conn)
    out_schema = pa.schema([*layer.attributes, pa.field(GEOMETRY, pa.binary())])
    with adbc_postgresql.connect(_conninfo_of(conn)) as reader_conn, \
            reader_conn.cursor() as cursor:
        cursor.adbc_statement.set_options(
            **{StatementOptions.BATCH_SIZE_HINT_BYTES.value: str(STREAM_BATCH_BYTES)})
        cursor.execute(select)
        for batch in cursor.fetch_record_batch():
            if not batch.num_rows:
                continue
            table = pa.Table.from_arrays(
                [_conform(batch.column(i), field, layer) for i, field in enumerate(out_schema)],
                schema=out_schema)
            for start in range(0, table.num_rows, batch_rows):
                yield table.slice(start, batch_rows)


def export_table(
    conn: psycopg.Connection, layer: LayerTable, crs: str, store: ObjectStore, bucket: str,
    prefix: str, part_rows: int = 250_000,
) -> list[StagedPart]:
    """Stream ``layer`` out in ``_row_id`` order and stage it as GeoParquet parts in ``CRS``
    ``crs``: ``<prefix>part-<NNNNN>.parquet`` in ``bucket``, one part per batch of
    ``stream_table`` (at most ``part_rows`` rows; an empty table gives no part). Returns the
    parts, with their rows, bytes and sha256, for ``libs.lake.publish_to_lake``."""
    parts: list[StagedPart] = []
    # each part's PUT overlaps reading and encoding the next (two parts in memory at most)
    with BackgroundPuts(store, threads=1, max_pending=2) as puts:
        for number, batch in enumerate(stream_table(conn, layer, part_rows)):
            data = encode_wkb_table(batch, crs)
            key = f"{prefix}part-{number:05d}.parquet"
            puts.put(bucket, key, data, "application/vnd.apache.parquet")
            parts.append(StagedPart(key, batch.num_rows, len(data),
                                    hashlib.sha256(data).hexdigest()))
        puts.wait()
    return parts
