"""PostGIS stage: transient run schemas, COPY BINARY loading, spatial joins, streaming results out.

Every identifier is composed with ``psycopg.sql``; nothing user-supplied is pasted into SQL.
A run's schema is named from its run id (``etl_run_<uuid hex>``), so the janitor can map a
schema back to its run.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pyarrow as pa
import shapely
from psycopg import sql

from libs.errors import LoadError
from libs.geoparquet import GEOMETRY
from libs.manifest import SpatialJoin

SCHEMA_PREFIX = "etl_run_"
ROW_ID = "_row_id"
GEOM = "geom"
_SCHEMA_RE = re.compile(rf"^{SCHEMA_PREFIX}([0-9a-f]{{32}})$")


@dataclass(frozen=True)
class PostGISSettings:
    """Connection settings; timeouts bound every statement and lock wait of the pipeline."""

    host: str
    port: int
    user: str
    password: str
    dbname: str = "spatial_compute"
    statement_timeout_ms: int = 600_000
    lock_timeout_ms: int = 30_000
    application_name: str = "spatial-etl"

    def __repr__(self) -> str:  # never print the password
        return f"PostGISSettings(host={self.host!r}, port={self.port}, dbname={self.dbname!r})"


def connect(settings: PostGISSettings, *, autocommit: bool = False) -> psycopg.Connection:
    return psycopg.connect(
        host=settings.host,
        port=settings.port,
        user=settings.user,
        password=settings.password,
        dbname=settings.dbname,
        application_name=settings.application_name,
        autocommit=autocommit,
        options=f"-c statement_timeout={settings.statement_timeout_ms} "
        f"-c lock_timeout={settings.lock_timeout_ms}",
    )


def run_schema_name(run_id: str) -> str:
    """``etl_run_`` + the run id's 32 hex digits: 40 bytes, well under PostgreSQL's 63."""
    hex_id = run_id.replace("-", "").lower()
    if not re.fullmatch(r"[0-9a-f]{32}", hex_id):
        raise ValueError(f"run id {run_id!r} is not a UUID")
    return SCHEMA_PREFIX + hex_id


def run_id_of_schema(schema: str) -> str | None:
    """The Dagster run id a run schema belongs to, or None for any other schema."""
    match = _SCHEMA_RE.match(schema)
    if not match:
        return None
    h = match.group(1)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def create_schema(conn: psycopg.Connection, schema: str) -> None:
    """Create a run schema; its comment records when, so a janitor can judge its age."""
    with conn.transaction():
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
            sql.Identifier(schema),
            sql.Literal(json.dumps({"created_at": time.time(), "by": "spatial-etl"}))))


def drop_schema(conn: psycopg.Connection, schema: str) -> None:
    if not schema.startswith(SCHEMA_PREFIX):
        raise ValueError(f"refusing to drop {schema!r}: not a run schema")
    with conn.transaction():
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def list_run_schemas(conn: psycopg.Connection) -> dict[str, float | None]:
    """Run schemas and their age in seconds (None when the creation time is unknown)."""
    rows = conn.execute(
        "SELECT nspname, obj_description(oid, 'pg_namespace') FROM pg_namespace "
        "WHERE nspname LIKE %s ORDER BY nspname",
        (SCHEMA_PREFIX.replace("_", r"\_") + "%",),
    ).fetchall()
    schemas: dict[str, float | None] = {}
    for name, comment in rows:
        if not _SCHEMA_RE.match(name):
            continue
        try:
            schemas[name] = time.time() - float(json.loads(comment)["created_at"])
        except (TypeError, ValueError, KeyError):
            schemas[name] = None
    return schemas


# -- loading -----------------------------------------------------------------------------------

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


def count_rows(conn: psycopg.Connection, schema: str, table: str) -> int:
    return conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(
        sql.Identifier(schema), sql.Identifier(table))).fetchone()[0]


# -- joins -------------------------------------------------------------------------------------

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
