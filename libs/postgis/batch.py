"""The PostGIS stage of one batch: a transient schema, every layer COPYed in and indexed for
the join, the join, its result staged as GeoParquet, the schema dropped whatever happens.

The schema lives exactly as long as ``load_and_join``: a re-execution from a later step never
depends on it, and a run killed outright leaves it to the schema janitor. A point layer the
join probes with BRIN is COPYed on one connection in chunk order (its pages must keep the
shard's Hilbert order), which leaves about a third of two cores idle, so the other layers
load beside it on connections of their own. When the stage fails (a connection lost to a
server restart included), the error raised is the one that failed it; dropping the schema
afterwards is best effort (on a new connection if the stage's is gone) and never hides it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial

import psycopg
import pyarrow as pa
from pyproj import CRS

from libs.descriptors import ChunkIndex, LayerChunks, StagedPart
from libs.errors import LoadError, ReconciliationError
from libs.geoparquet import GEOMETRY, read_parquet_table
from libs.manifest import SpatialJoin
from libs.memory import release_memory
from libs.object_store import ObjectStore
from libs.postgis.connection import (
    ROW_ID,
    PostGISSettings,
    connect,
    count_rows,
    create_schema,
    drop_schema,
)
from libs.postgis.export import export_table
from libs.postgis.join import reconcile_join, run_spatial_join, spatial_index_for
from libs.postgis.load import ChunkLoaded, ChunkSource, load_layer_chunks
from libs.postgis.tables import (
    LayerTable,
    attribute_schema,
    column_geometry_type,
    create_layer_table,
    index_and_analyze,
)
from libs.retry import describe

#: Called as each chunk is loaded: (layer, what loading it took, the chunk's staged bytes).
ChunkLoadedCallback = Callable[[str, ChunkLoaded, int], None]


@dataclass(frozen=True)
class JoinOutput:
    """One join's result: its staged parts, rows, columns and the seconds it took."""

    name: str
    parts: list[StagedPart]
    rows: int
    columns: list[str]
    seconds: float


@dataclass(frozen=True)
class JoinedBatch:
    """What the PostGIS stage produced: each join's result and the timings."""

    joins: list[JoinOutput]
    loaded_rows: int
    load_seconds: float
    join_seconds: float


#: PostgreSQL's limit on the columns of one table (MaxHeapAttributeNumber).
MAX_TABLE_COLUMNS = 1600
#: Columns a loaded layer table has besides its attributes: ``_row_id`` and the geometry.
_LAYER_COLUMNS = 2


def loaded_columns(joins: list[SpatialJoin], layer: str) -> list[str] | None:
    """The attribute columns of ``layer`` the joins read, in the order they are named; None
    when they read all of them (a left layer whose join lists no ``left_columns``).

    A right layer gives only the columns its joins aggregate or carry: a wide layer loads
    what the joins need while the lake keeps all of its columns."""
    needed: list[str] = []
    for join in joins:
        if join.left == layer:
            if join.left_columns is None:
                return None
            needed += join.left_columns
        if join.right == layer:
            needed += [a.column for a in join.aggregations if a.column is not None]
            needed += [column for column, _ in join.carried_columns()]
    return list(dict.fromkeys(needed))


def join_load_problem(joins: list[SpatialJoin], layer: str,
                           attributes: list[str]) -> str | None:
    """Why ``layer`` (after its recipe: ``attributes``) cannot be loaded for its joins:
    columns they name that it lacks (``left_columns``, aggregated or carried), or more
    columns than a PostgreSQL table holds, in the layer's table or a join's result. None when
    it can (or when no join reads it: a layer only ingested is never loaded)."""
    reading = [j for j in joins if layer in (j.left, j.right)]
    if not reading:
        return None
    missing = [f"{j.name}: {c}" for j in reading for c in loaded_columns([j], layer) or []
               if c not in attributes]
    if missing:
        shown = attributes[:20] + (["..."] if len(attributes) > 20 else [])
        return (f"layer {layer!r}: join(s) name columns it does not have {missing} (as "
                f"left_columns, or aggregated or carried); its columns are {shown}")
    columns = loaded_columns(joins, layer)
    width = (len(attributes) if columns is None else len(columns)) + _LAYER_COLUMNS
    if width <= MAX_TABLE_COLUMNS:
        return _result_width_problem([j for j in reading if j.left == layer], layer, attributes)
    lefts = [j.name for j in reading if j.left == layer and j.left_columns is None]
    return (f"layer {layer!r} has {len(attributes):,} attribute columns; a PostgreSQL table "
            f"holds at most {MAX_TABLE_COLUMNS:,} columns ({_LAYER_COLUMNS} of them the row id "
            f"and the geometry), and join(s) {lefts} read all of them as their left layer. "
            "List the columns the join result needs in the join's 'left_columns' (the lake "
            "keeps every column of the layer either way)")


def srid_of(target_crs: str) -> int:
    """The PostGIS SRID of the manifest's target CRS (its EPSG code)."""
    epsg = CRS.from_user_input(target_crs).to_epsg()
    if epsg is None:
        raise LoadError(f"target_crs {target_crs!r} has no EPSG code; PostGIS needs an SRID")
    return epsg


def _result_width_problem(joins: list[SpatialJoin], layer: str,
                          attributes: list[str]) -> str | None:
    """A join result is a table too: the left columns it keeps, its aggregates or carried
    columns (and distance), the row id and the geometry."""
    for join in joins:
        kept = len(join.left_columns) if join.left_columns is not None else len(attributes)
        added = len(join.carried_columns()) + int(bool(join.carry) and join.measures_distance) \
            if join.carry is not None else len(join.aggregations)
        if kept + added + _LAYER_COLUMNS > MAX_TABLE_COLUMNS:
            return (f"join {join.name!r}: its result would have {kept + added + _LAYER_COLUMNS:,} "
                    f"columns ({kept:,} of left layer {layer!r}, {added} added by the join), "
                    f"more than the {MAX_TABLE_COLUMNS:,} a PostgreSQL table holds; list the "
                    "left columns the result needs in the join's 'left_columns'")
    return None


def load_and_join(
    settings: PostGISSettings, store: ObjectStore, transformed: ChunkIndex,
    joins: list[SpatialJoin], target_crs: str, schema: str,
    result_key: Callable[[str, int], str], *, copy_parallelism: int, copy_retries: int = 2,
    on_chunk: ChunkLoadedCallback | None = None, log: Callable[[str], None] = lambda line: None,
) -> JoinedBatch:
    """Load the layers ``joins`` read into ``schema`` (only the columns they read), run each
    join, stage its result (part ``n`` of join ``name`` at ``result_key(name, n)`` in the
    staging bucket), reconcile, and drop the schema. No join: nothing touches PostGIS."""
    if not joins:
        return JoinedBatch(joins=[], loaded_rows=0, load_seconds=0.0, join_seconds=0.0)
    srid = srid_of(target_crs)
    joined_layers = [layer for layer in transformed.layers
                     if any(layer.layer in (j.left, j.right) for j in joins)]
    indexes = {layer.layer: _index_for(joins, layer.layer, column_geometry_type(
        transformed.geometry_types.get(layer.layer, []))) for layer in joined_layers}
    load_layer = partial(_load_layer, settings, store, transformed, schema, srid, joins,
                         copy_parallelism, copy_retries, on_chunk or (lambda *_: None), log)

    def load_beside(layer: LayerChunks) -> LayerTable:
        with connect(settings) as own:
            return load_layer(own, layer, indexes[layer.layer])

    with connect(settings) as conn:
        try:
            create_schema(conn, schema)
            log(f"created transient schema {schema}")
            load_started = time.monotonic()
            tables: dict[str, LayerTable] = {}
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-ordered") as beside:
                ordered = {layer.layer: beside.submit(load_beside, layer)
                           for layer in joined_layers if indexes[layer.layer] == "brin"}
                for layer in joined_layers:
                    if layer.layer not in ordered:
                        tables[layer.layer] = load_layer(conn, layer, indexes[layer.layer])
                for name, future in ordered.items():
                    tables[name] = future.result()
            load_seconds = time.monotonic() - load_started
            outputs = [_join_and_export(conn, store, transformed.staging_bucket, join, tables,
                                        target_crs, partial(result_key, join.name), log)
                       for join in joins]
        except BaseException as error:
            final = _failed(error, schema, _drop_after_failure(conn, settings, schema, log))
            if final is error:
                raise
            raise final from error
        conn.rollback()
        drop_schema(conn, schema)
        log(f"dropped transient schema {schema}")
    return JoinedBatch(joins=outputs, loaded_rows=sum(layer.rows for layer in joined_layers),
                       load_seconds=load_seconds,
                       join_seconds=sum(output.seconds for output in outputs))


def _index_for(joins: list[SpatialJoin], layer: str, geometry_type: str) -> str | None:
    """The one spatial index serving every join that probes ``layer``: GiST serves what BRIN
    does, so it wins when the joins differ."""
    wanted = {spatial_index_for(join, layer, geometry_type) for join in joins} - {None}
    return "gist" if "gist" in wanted else ("brin" if wanted else None)


def _join_and_export(conn: psycopg.Connection, store: ObjectStore, bucket: str, join: SpatialJoin,
                     tables: dict[str, LayerTable], target_crs: str,
                     result_key: Callable[[int], str], log: Callable[[str], None]) -> JoinOutput:
    """Run one join (its left layer as the join sees it: only its ``left_columns`` when it
    lists them), stage its result, reconcile its rows."""
    started = time.monotonic()
    # end the implicit transaction the layers' counts (or the previous join's reconciliation)
    # left open, so that the join's table commits (the export reads it on a connection of
    # its own)
    conn.commit()
    left = tables[join.left]
    if join.left_columns is not None:
        left = replace(left, attributes=pa.schema([left.attributes.field(c)
                                                   for c in join.left_columns]))
    result = run_spatial_join(conn, join, left, tables[join.right])
    parts = export_table(conn, result, target_crs, store, bucket, result_key)
    rows = sum(part.rows for part in parts)
    seconds = time.monotonic() - started
    log(f"join {join.name}: {rows:,} rows in {len(parts)} part(s), "
        f"{rows / seconds if seconds else 0:,.0f} features/s")
    reconcile_join(conn, join, left, result, rows)
    return JoinOutput(name=join.name, parts=parts, rows=rows,
                      columns=[*result.attributes.names, "geometry"], seconds=seconds)


#: How long dropping the run schema after a failure keeps trying to reach the server (it may
#: be restarting); past it the schema is left to the janitor.
DROP_AFTER_FAILURE_TRIES = (0.0, 1.0, 2.0, 4.0)


def _drop_after_failure(conn: psycopg.Connection, settings: PostGISSettings, schema: str,
                        log: Callable[[str], None]) -> BaseException | None:
    """Drop ``schema`` after the stage failed: on ``conn`` if it still works, else on a new
    connection, retried briefly. Returns the error that stopped it (logged), or None."""
    if not conn.closed and not conn.broken:
        try:
            conn.rollback()
            drop_schema(conn, schema)
            log(f"dropped transient schema {schema}")
            return None
        except psycopg.Error as exc:
            log(f"could not drop {schema} on the stage's connection ({describe(exc)}); "
                "trying a new one")
    problem: BaseException | None = None
    for pause in DROP_AFTER_FAILURE_TRIES:
        time.sleep(pause)
        try:
            with connect(settings, autocommit=True) as fresh:
                drop_schema(fresh, schema)
            log(f"dropped transient schema {schema} on a new connection")
            return None
        except psycopg.Error as exc:
            problem = exc
    log(f"could not drop transient schema {schema} ({describe(problem)}); the schema janitor "
        "drops it once no session holds it")
    return problem


def _failed(error: BaseException, schema: str, cleanup: BaseException | None) -> BaseException:
    """The exception to raise for a failed stage: ``error`` itself, or, for a lost or refused
    connection, a ``LoadError`` naming that cause (the caller chains ``error`` to it); a
    cleanup failure is added as a note, never raised in its place."""
    if isinstance(error, psycopg.OperationalError):
        error = LoadError(
            f"PostGIS stage of schema {schema}: the connection to PostGIS was lost or refused "
            f"({describe(error)}): the server restarted, shut down or became unreachable. "
            "Nothing was published; re-execute the run from failure once PostGIS is up")
    if cleanup is not None:
        error.add_note(f"then dropping schema {schema} failed too ({describe(cleanup)}); the "
                       "schema janitor will drop it")
    return error


def _load_layer(
    settings: PostGISSettings, store: ObjectStore, transformed: ChunkIndex, schema: str, srid: int,
    joins: list[SpatialJoin], copy_parallelism: int, copy_retries: int,
    on_chunk: ChunkLoadedCallback, log: Callable[[str], None], conn: psycopg.Connection,
    layer: LayerChunks, spatial_index: str | None,
) -> LayerTable:
    """Create the layer's typed table with the columns the joins read (``loaded_columns``),
    COPY its chunks, index it for the joins (the probed layer's ``spatial_index``; the primary
    key on a left layer only, which a join reads in ``_row_id`` order), reconcile counts.
    ``conn`` is this layer's alone while it loads.

    The first chunk is read here for the layer's columns (and then loaded as is); the loader's
    fetch thread reads the others, one per connection ahead of the COPYs.
    """
    if not layer.chunks:
        raise LoadError(f"layer {layer.layer!r} has no chunks to load; the transform stage "
                        "should have written at least one (possibly empty) chunk")
    staging = transformed.staging_bucket
    needed = loaded_columns(joins, layer.layer)
    keep = (lambda name: True) if needed is None else \
        (lambda name: name in (ROW_ID, GEOMETRY) or name in needed)
    first = read_parquet_table(store.get_bytes(staging, layer.chunks[0].key), keep)
    table = LayerTable(schema, layer.layer, attribute_schema(first), srid,
                       column_geometry_type(transformed.geometry_types.get(layer.layer, [])))
    parallelism = 1 if spatial_index == "brin" else copy_parallelism
    # the loader's own connections must see the table: end any implicit transaction (a
    # previous layer's count) so that CREATE TABLE commits instead of becoming a savepoint
    conn.commit()
    create_layer_table(conn, table)

    def fetch(key: str) -> pa.Table:
        return read_parquet_table(store.get_bytes(staging, key), keep)

    held = [first]  # handed over once: the loader's worker then holds the only reference
    del first
    sources: list[ChunkSource] = [(layer.chunks[0].id_span, held.pop)]
    sources += [(c.id_span, partial(fetch, c.key)) for c in layer.chunks[1:]]
    chunk_bytes = {c.id_span: c.bytes for c in layer.chunks}

    def chunk_loaded(done: ChunkLoaded) -> None:
        on_chunk(layer.layer, done, chunk_bytes.get(done.id_span, 0))
        release_memory()

    copy_started = time.monotonic()
    copied = load_layer_chunks(settings, table, sources, parallelism=parallelism,
                               retries=copy_retries, on_chunk=chunk_loaded)
    copy_seconds = time.monotonic() - copy_started
    keyed = any(layer.layer == join.left for join in joins)  # read in _row_id order
    index_started = time.monotonic()
    index_and_analyze(conn, table, spatial_index=spatial_index, primary_key=keyed)
    index_seconds = time.monotonic() - index_started
    loaded = count_rows(conn, schema, layer.layer)
    if loaded != layer.rows or copied != layer.rows:
        raise ReconciliationError(f"layer {layer.layer!r}: {layer.rows} rows transformed, "
                                  f"{copied} copied, {loaded} in the table")
    built = [*([spatial_index.upper()] if spatial_index else []),
             *(["primary key"] if keyed else []), "ANALYZE"]
    log(f"loaded layer {layer.layer}: {loaded} rows, COPY at "
        f"{loaded / copy_seconds if copy_seconds else 0:,.0f} rows/s with "
        f"{parallelism} connection(s), {' + '.join(built)} in {index_seconds:.1f}s")
    return table
