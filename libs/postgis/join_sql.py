"""The SQL of a spatial join (``libs.manifest.SpatialJoin``), composed with ``psycopg.sql``.

A join matches right rows to each left row in a ``LATERAL`` subquery, so the right layer's
index is probed once per left row; distances are on the ellipsoid (geography) in a
geographic CRS. An aggregating ``intersects`` of polygons with points runs part by part
instead (``subdivided_query``), which PostgreSQL can run in parallel workers. Nothing here
touches a connection: ``libs.postgis.join`` runs these queries. Shapes, the nearest-neighbour
method and the measurements behind them: docs/postgis-join.md.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
from psycopg import sql
from pyproj import CRS
from pyproj.exceptions import CRSError

from libs.errors import LoadError
from libs.manifest import SpatialJoin, distance_unit_problem
from libs.postgis.connection import GEOM, ROW_ID
from libs.postgis.tables import LayerTable

PREDICATE_FUNCTIONS = {"intersects": "ST_Intersects", "contains": "ST_Contains", "within": "ST_Within"}
#: Internal columns of a carrying join's result table (never streamed out).
LEFT_ROW_ID = "_left_row_id"
RIGHT_ROW_ID = "_right_row_id"
_DISTANCE = "_distance"
_MATCHES = "_matches"
_RESERVED = frozenset({ROW_ID, GEOM, LEFT_ROW_ID, RIGHT_ROW_ID, _DISTANCE, _MATCHES})


def _numeric(field: pa.Field) -> bool:
    return pa.types.is_integer(field.type) or pa.types.is_floating(field.type) or \
        pa.types.is_decimal(field.type)


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
    table = right.qualified
    rid = sql.Identifier(ROW_ID)
    if join.predicate in PREDICATE_FUNCTIONS:
        return sql.SQL("SELECT {cols} FROM {table} r WHERE {pred}(l.{g}, r.{g})").format(
            cols=columns, table=table, pred=sql.SQL(PREDICATE_FUNCTIONS[join.predicate]),
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
    left_table = left.qualified
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
def subdivides(join: SpatialJoin, left: LayerTable, right: LayerTable) -> bool:
    """Whether the join runs part by part over the left geometries (see the module docstring):
    an aggregating ``intersects`` of polygonal left rows with right points."""
    return (join.predicate == "intersects" and join.carry is None
            and left.geometry_type.rstrip("ZM") in _SUBDIVIDABLE
            and right.geometry_type.rstrip("ZM") == "Point")  # 3D layers: 2D predicates


def helper_table_name(join: SpatialJoin, left: LayerTable, what: str) -> sql.Composed:
    digest = hashlib.sha256(f"{left.schema}.{join.name}".encode()).hexdigest()[:8]
    return sql.SQL("{}.{}").format(sql.Identifier(left.schema),
                                   sql.Identifier(f"{join.name[:40]}_{digest}_{what}"))



def subdivided_query(join: SpatialJoin, left: LayerTable, right: LayerTable,
                      pieces: sql.Composed, seams: sql.Composed) -> sql.Composed:
    """The aggregating ``intersects`` join over ``_build_pieces``' pieces: partial aggregates
    per left row over (piece, point) matches, minus the repeats of points on seams."""
    g = sql.Identifier(GEOM)
    rid = sql.Identifier(ROW_ID)
    right_table = right.qualified
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
        outputs=sql.SQL(", ").join(outputs), left=left.qualified, matches=matches,
        extra=extra, where=where, rid=rid)

