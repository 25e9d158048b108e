"""Loading chunks into a run schema: typed tables, COPY (FORMAT BINARY) of EWKB, indexes."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import pyarrow as pa
import shapely
from psycopg import sql

from libs.errors import LoadError
from libs.geoparquet import GEOMETRY
from libs.postgis import GEOM, ROW_ID


def _pg_type(field: pa.Field) -> tuple[str, str]:
    """(column type, psycopg binary dumper name) for an Arrow field."""
    t = field.type
    if pa.types.is_boolean(t):
        return "boolean", "bool"
    if pa.types.is_int8(t) or pa.types.is_int16(t) or pa.types.is_uint8(t):
        return "smallint", "int2"
    if pa.types.is_int32(t) or pa.types.is_uint16(t):
        return "integer", "int4"
    if pa.types.is_int64(t) or pa.types.is_uint32(t):
        return "bigint", "int8"
    if pa.types.is_uint64(t) or pa.types.is_decimal(t):
        return "numeric", "numeric"
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        return "real", "float4"
    if pa.types.is_floating(t):
        return "double precision", "float8"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "text", "text"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "bytea", "bytea"
    if pa.types.is_date(t):
        return "date", "date"
    if pa.types.is_timestamp(t):
        return ("timestamptz", "timestamptz") if t.tz else ("timestamp", "timestamp")
    raise LoadError(
        f"column {field.name!r} has Arrow type {t} which has no PostgreSQL mapping yet; "
        "cast it to a number, text, boolean, date or timestamp"
    )


@dataclass(frozen=True)
class LayerTable:
    """A loaded layer: its table, attribute columns (Arrow schema) and SRID."""

    schema: str
    table: str
    attributes: pa.Schema
    srid: int
    geometry_type: str = "Geometry"


def attribute_schema(table: pa.Table) -> pa.Schema:
    """The Arrow schema of a chunk's attributes (no geometry, row id or GeoParquet covering)."""
    return pa.schema([f for f in table.schema if f.name not in (GEOMETRY, "bbox", ROW_ID)])


_GEOMETRY_TYPES = {"Point", "LineString", "Polygon", "MultiPoint", "MultiLineString",
                   "MultiPolygon", "GeometryCollection"}


def column_geometry_type(geometry_types: list[str]) -> str:
    """The typed column for a layer: its one geometry type, else the generic ``Geometry``."""
    if len(geometry_types) == 1 and geometry_types[0] in _GEOMETRY_TYPES:
        return geometry_types[0]
    return "Geometry"


def create_layer_table(conn: psycopg.Connection, layer: LayerTable) -> None:
    reserved = {ROW_ID, GEOM}
    columns = [sql.SQL("{} bigint NOT NULL").format(sql.Identifier(ROW_ID))]
    for field in layer.attributes:
        if field.name in reserved:
            raise LoadError(
                f"layer {layer.table!r}: column {field.name!r} is reserved by the loader; rename it"
            )
        columns.append(sql.SQL("{} {}").format(
            sql.Identifier(field.name), sql.SQL(_pg_type(field)[0])))
    if layer.geometry_type not in _GEOMETRY_TYPES | {"Geometry"}:
        raise LoadError(f"layer {layer.table!r}: unknown geometry type {layer.geometry_type!r}")
    columns.append(sql.SQL("{} geometry({}, {})").format(
        sql.Identifier(GEOM), sql.SQL(layer.geometry_type), sql.Literal(layer.srid)))
    with conn.transaction():
        conn.execute(sql.SQL("CREATE TABLE {}.{} ({})").format(
            sql.Identifier(layer.schema), sql.Identifier(layer.table), sql.SQL(", ").join(columns)))


def copy_chunk_into_table(
    conn: psycopg.Connection, layer: LayerTable, chunk: pa.Table, id_span: tuple[int, int]
) -> int:
    """COPY one chunk in its own transaction; a retried chunk replaces its rows, never duplicates.

    Row ids come from the chunk's ``_row_id`` column (else ``id_span`` start + position); the
    chunk owns every id in ``id_span`` = [start, end), which is what a retry deletes first.
    """
    start, end = id_span
    if attribute_schema(chunk) != layer.attributes:
        raise LoadError(
            f"layer {layer.table!r}: chunk columns {attribute_schema(chunk)} differ from the "
            f"layer's {layer.attributes}; every file of a layer must have the same columns"
        )
    names = [f.name for f in layer.attributes]
    dumpers = ["int8"] + [_pg_type(f)[1] for f in layer.attributes] + ["bytea"]
    geoms = shapely.from_wkb(chunk.column(GEOMETRY).to_numpy(zero_copy_only=False))
    ewkb = shapely.to_wkb(shapely.set_srid(geoms, layer.srid), include_srid=True)
    if ROW_ID in chunk.column_names:
        columns = [chunk.column(ROW_ID).to_pylist()]
    else:
        columns = [range(start, start + chunk.num_rows)]
    columns += [chunk.column(n).to_pylist() for n in names]
    columns.append(ewkb)
    target = sql.SQL("{}.{} ({})").format(
        sql.Identifier(layer.schema), sql.Identifier(layer.table),
        sql.SQL(", ").join(sql.Identifier(n) for n in [ROW_ID, *names, GEOM]))
    try:
        with conn.transaction():
            conn.execute(
                sql.SQL("DELETE FROM {}.{} WHERE {} >= %s AND {} < %s").format(
                    sql.Identifier(layer.schema), sql.Identifier(layer.table),
                    sql.Identifier(ROW_ID), sql.Identifier(ROW_ID)),
                (start, end))
            with conn.cursor().copy(sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(target)) as copy:
                copy.set_types(dumpers)
                for row in zip(*columns, strict=True):
                    copy.write_row(row)
    except psycopg.errors.DataException as exc:
        raise LoadError(
            f"layer {layer.table!r}, rows with _row_id {start}-{end - 1}: PostgreSQL rejected "
            f"the data: {exc.diag.message_primary}"
        ) from None
    return chunk.num_rows


def index_and_analyze(conn: psycopg.Connection, layer: LayerTable) -> None:
    ident = sql.SQL("{}.{}").format(sql.Identifier(layer.schema), sql.Identifier(layer.table))
    with conn.transaction():
        conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
            ident, sql.Identifier(ROW_ID)))
        conn.execute(sql.SQL("CREATE INDEX ON {} USING gist ({})").format(
            ident, sql.Identifier(GEOM)))
    conn.execute(sql.SQL("ANALYZE {}").format(ident))
    conn.commit()
