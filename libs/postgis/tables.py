"""Layer tables in a run schema: the Arrow → PostgreSQL type mapping, the typed table with its
``geometry(<type>, <srid>)`` column, and the indexes and statistics built once it is loaded.

Tables are UNLOGGED with autovacuum off: they are scratch data in a transient run schema that
can be reloaded from the staged chunks, so the WAL and insert-triggered VACUUMs buy nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import pyarrow as pa
from psycopg import sql

from libs.errors import LoadError
from libs.geoparquet import GEOMETRY
from libs.postgis.connection import GEOM, ROW_ID


def pg_type(field: pa.Field) -> tuple[str, str]:
    """(column type, binary COPY type name) for an Arrow field; see ``libs.postgis.copy_binary``.

    Dictionary-encoded columns (pandas categoricals) load as their value type. Unsigned
    64-bit integers and decimals load as exact ``numeric``, never as a lossy float.
    """
    t = field.type
    if pa.types.is_dictionary(t):
        return pg_type(pa.field(field.name, t.value_type))
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

    @property
    def qualified(self) -> sql.Composed:
        """``"schema"."table"``, quoted for SQL."""
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(self.table))


def attribute_schema(table: pa.Table) -> pa.Schema:
    """The Arrow schema of a chunk's attributes (no geometry, row id or GeoParquet covering)."""
    return pa.schema([f for f in table.schema if f.name not in (GEOMETRY, "bbox", ROW_ID)])


GEOMETRY_TYPES = {"Point", "LineString", "Polygon", "MultiPoint", "MultiLineString",
                   "MultiPolygon", "GeometryCollection"}
#: PostGIS typmod suffixes of the dimensions a column can hold (``PointZ``, ``PolygonZM``).
_DIMENSIONS = ("", "Z", "M", "ZM")
#: Untyped column: geometries of more than one dimensionality (2D beside 3D) in one layer,
#: which no typmod admits together; the SRID is still enforced by a CHECK.
ANY_DIMENSION = "*"


def column_geometry_type(geometry_types: list[str]) -> str:
    """The typed column for a layer's geometry types ("Point Z", "LineString ZM"): its one
    type (``PointZ``, ``LineStringZM``), ``Geometry``/``GeometryZ``… for mixed families of one
    dimensionality, and ``ANY_DIMENSION`` (an untyped column) for mixed dimensions (2D beside
    3D). An empty layer (no types) gets ``Geometry``."""
    kinds, dims = set(), set()
    for name in geometry_types:
        kind, _, dim = name.partition(" ")
        kinds.add(kind)
        dims.add(dim)
    if len(dims) > 1:
        return ANY_DIMENSION
    dim = dims.pop() if dims else ""
    kind = kinds.pop() if len(kinds) == 1 else "Geometry"
    return (kind if kind in GEOMETRY_TYPES else "Geometry") + dim


def geometry_column_sql(geometry_type: str, srid: int) -> sql.Composable:
    """``geometry(<type>, <srid>)``, or for ``ANY_DIMENSION`` an untyped ``geometry`` whose
    SRID a CHECK enforces."""
    if geometry_type == ANY_DIMENSION:
        return sql.SQL("geometry CHECK (ST_SRID({}) = {})").format(
            sql.Identifier(GEOM), sql.Literal(srid))
    if not any(geometry_type == kind + dim for kind in GEOMETRY_TYPES | {"Geometry"}
               for dim in _DIMENSIONS):
        raise ValueError(f"unknown geometry type {geometry_type!r}")
    return sql.SQL("geometry({}, {})").format(sql.SQL(geometry_type), sql.Literal(srid))


def create_layer_table(conn: psycopg.Connection, layer: LayerTable, *, unlogged: bool = True) -> None:
    """Create the layer's table: ``_row_id``, typed attributes, ``geometry(<type>, <srid>)``.

    UNLOGGED by default: the table is scratch data in a run schema that lives only as long as
    the load-and-join op and can be reloaded from the staged chunks, so writing it to the WAL
    too buys nothing (a server crash fails the run either way) and costs about 15% of COPY
    throughput. Pass ``unlogged=False`` for a table that must survive a crash or replicate.

    Autovacuum is off for the table: the loader runs ANALYZE itself once the rows are in,
    and nothing deletes or updates them, so an insert-triggered VACUUM (PostgreSQL 13+
    starts one after every 20% of new rows) would only read the whole table again while the
    index builds and the join want the cores.
    """
    reserved = {ROW_ID, GEOM}
    columns = [sql.SQL("{} bigint NOT NULL").format(sql.Identifier(ROW_ID))]
    for field in layer.attributes:
        if field.name in reserved:
            raise LoadError(
                f"layer {layer.table!r}: column {field.name!r} is reserved by the loader; rename it"
            )
        columns.append(sql.SQL("{} {}").format(
            sql.Identifier(field.name), sql.SQL(pg_type(field)[0])))
    try:
        column = geometry_column_sql(layer.geometry_type, layer.srid)
    except ValueError as exc:
        raise LoadError(f"layer {layer.table!r}: {exc}") from None
    columns.append(sql.SQL("{} {}").format(sql.Identifier(GEOM), column))
    with conn.transaction():
        conn.execute(sql.SQL("CREATE {}TABLE {} ({}) WITH (autovacuum_enabled = false)").format(
            sql.SQL("UNLOGGED " if unlogged else ""), layer.qualified, sql.SQL(", ").join(columns)))


#: Spatial indexes a layer can get: ``gist`` (any probe, KNN) or ``brin`` (bbox probes of a
#: layer whose rows lie in the table in spatial order).
SPATIAL_INDEXES = ("gist", "brin")
#: Heap pages per BRIN summary: ~500-1,000 points of a layer a few attributes wide. Measured on
#: 10M Hilbert-ordered points joined with 177 countries: 8 pages 2.4 s, 32 pages 2.8 s, 128
#: pages 3.9 s (GiST: 2.6 s); every size builds in ~1.5 s.
BRIN_PAGES_PER_RANGE = 8


def index_and_analyze(conn: psycopg.Connection, layer: LayerTable, *,
                      spatial_index: str | None = "gist", primary_key: bool = True) -> None:
    """Primary key on ``_row_id`` (when ``primary_key``), the ``spatial_index`` on the
    geometry (None: none), then ANALYZE.

    The loader already proved the ids distinct (each chunk's ids lie in its own span and
    repeat none), so the key is for queries that read the layer in ``_row_id`` order (a
    join's left layer); elsewhere it would cost ~0.3 s per million rows on one core for
    nothing.

    ``gist`` serves every probe a join makes, KNN included; a sorted GiST build costs ~1.2 s
    per million points on one core. ``brin`` keeps one bbox per ``BRIN_PAGES_PER_RANGE``
    heap pages and builds in ~0.15 s per million: a probe reads the pages of every summary
    its bbox overlaps, so it pays only when the rows lie in the table in spatial order (a
    layer's chunks COPYed one after another in the shard's Hilbert order) and the geometries
    are small against the layer (points); it answers bbox operators (``&&``, ``~``, ``@``)
    and no KNN. A layer no join touches gets no spatial index: the run schema is dropped at
    the end of the op and nothing else queries it.
    """
    if spatial_index not in (None, *SPATIAL_INDEXES):
        raise ValueError(f"spatial_index must be one of {SPATIAL_INDEXES} or None, "
                         f"got {spatial_index!r}")
    ident = layer.qualified
    with conn.transaction():
        if primary_key:
            conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
                ident, sql.Identifier(ROW_ID)))
        if spatial_index == "gist":
            conn.execute(sql.SQL("CREATE INDEX ON {} USING gist ({})").format(
                ident, sql.Identifier(GEOM)))
        elif spatial_index == "brin":
            conn.execute(sql.SQL("CREATE INDEX ON {} USING brin ({}) WITH (pages_per_range = {})")
                         .format(ident, sql.Identifier(GEOM), sql.Literal(BRIN_PAGES_PER_RANGE)))
    conn.execute(sql.SQL("ANALYZE {}").format(ident))
    conn.commit()
