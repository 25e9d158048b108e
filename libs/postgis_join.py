"""Spatial joins inside a run schema, and streaming tables back out without fetchall."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pyarrow as pa
from psycopg import sql

from libs.errors import LoadError
from libs.geoparquet import GEOMETRY
from libs.manifest import SpatialJoin
from libs.postgis import GEOM, ROW_ID
from libs.postgis_load import LayerTable

_PREDICATES = {"intersects": "ST_Intersects", "contains": "ST_Contains", "within": "ST_Within"}


def _numeric(field: pa.Field) -> bool:
    return pa.types.is_integer(field.type) or pa.types.is_floating(field.type) or \
        pa.types.is_decimal(field.type)


def join_output_schema(join: SpatialJoin, left: LayerTable, right: LayerTable) -> pa.Schema:
    """Check the join against the loaded layers and return the result's attribute schema."""
    fields = list(left.attributes)
    for agg in join.aggregations:
        if agg.output in left.attributes.names:
            raise LoadError(
                f"join {join.name!r}: aggregation output {agg.output!r} clashes with a column of "
                f"layer {join.left!r}; choose another output name"
            )
        if agg.function == "count":
            fields.append(pa.field(agg.output, pa.int64()))
            continue
        if agg.column not in right.attributes.names:
            raise LoadError(
                f"join {join.name!r}: column {agg.column!r} does not exist in layer "
                f"{join.right!r}; expected one of {right.attributes.names}"
            )
        if not _numeric(right.attributes.field(agg.column)):
            raise LoadError(
                f"join {join.name!r}: {agg.function} needs a numeric column but {agg.column!r} of "
                f"layer {join.right!r} is {right.attributes.field(agg.column).type}"
            )
        fields.append(pa.field(agg.output, pa.float64()))
    return pa.schema(fields)


def run_spatial_join(
    conn: psycopg.Connection, join: SpatialJoin, left: LayerTable, right: LayerTable
) -> LayerTable:
    """Materialise ``join`` as a table in the run schema: every left row plus its aggregates."""
    if left.srid != right.srid:
        raise LoadError(
            f"join {join.name!r}: layer {join.left!r} has SRID {left.srid} but {join.right!r} has "
            f"{right.srid}; both must be in the manifest's target_crs"
        )
    out_schema = join_output_schema(join, left, right)
    aggregates = []
    for agg in join.aggregations:
        if agg.function == "count":
            expr = sql.SQL("count(*)")
        else:
            fn = sql.SQL("sum") if agg.function == "sum" else sql.SQL("avg")
            expr = sql.SQL("{}(r.{})::double precision").format(fn, sql.Identifier(agg.column))
        aggregates.append(sql.SQL("{} AS {}").format(expr, sql.Identifier(agg.output)))
    if join.how == "inner":
        # an extra count decides membership without depending on the user's aggregates
        aggregates.append(sql.SQL("count(*) AS _matches"))
        where = sql.SQL("WHERE a._matches > 0")
    else:
        where = sql.SQL("")
    result = LayerTable(left.schema, join.name, out_schema, left.srid)
    query = sql.SQL(
        "CREATE TABLE {out} AS SELECT l.*, {agg_cols} FROM {left} l CROSS JOIN LATERAL "
        "(SELECT {aggs} FROM {right} r WHERE {pred}(l.{g}, r.{g})) a {where}"
    ).format(
        out=sql.SQL("{}.{}").format(sql.Identifier(result.schema), sql.Identifier(result.table)),
        agg_cols=sql.SQL(", ").join(sql.SQL("a.{}").format(sql.Identifier(a.output))
                                    for a in join.aggregations),
        left=sql.SQL("{}.{}").format(sql.Identifier(left.schema), sql.Identifier(left.table)),
        right=sql.SQL("{}.{}").format(sql.Identifier(right.schema), sql.Identifier(right.table)),
        aggs=sql.SQL(", ").join(aggregates),
        pred=sql.SQL(_PREDICATES[join.predicate]),
        g=sql.Identifier(GEOM),
        where=where,
    )
    with conn.transaction():
        conn.execute(query)
    return result


def stream_table(
    conn: psycopg.Connection, layer: LayerTable, batch_rows: int = 50_000
) -> Iterator[pa.Table]:
    """Yield the table in ``_row_id`` order as Arrow tables (WKB ``geometry``), via a server-side
    cursor so memory holds one batch, never the whole result."""
    names = layer.attributes.names
    select = sql.SQL("SELECT {}, ST_AsBinary({}) FROM {}.{} ORDER BY {}").format(
        sql.SQL(", ").join(sql.Identifier(n) for n in names) if names else sql.SQL("1"),
        sql.Identifier(GEOM), sql.Identifier(layer.schema), sql.Identifier(layer.table),
        sql.Identifier(ROW_ID))
    out_schema = pa.schema([*layer.attributes, pa.field(GEOMETRY, pa.binary())])
    with conn.transaction(), conn.cursor(name=f"stream_{layer.table}") as cursor:
        cursor.itersize = batch_rows
        cursor.execute(select)
        while rows := cursor.fetchmany(batch_rows):
            columns = list(zip(*rows, strict=True))
            if not names:
                columns = columns[1:]
            arrays = [pa.array(col, type=f.type) for col, f in zip(columns, out_schema, strict=True)]
            yield pa.Table.from_arrays(arrays, schema=out_schema)
