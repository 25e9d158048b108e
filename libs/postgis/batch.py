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
from dataclasses import dataclass
from functools import partial

import psycopg
import pyarrow as pa
from pyproj import CRS

from libs.descriptors import ChunkIndex, LayerChunks, StagedPart
from libs.errors import LoadError, ReconciliationError
from libs.geoparquet import read_parquet_table
from libs.manifest import SpatialJoin
from libs.memory import release_memory
from libs.object_store import ObjectStore
from libs.postgis.connection import (
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
class JoinedBatch:
    """What the PostGIS stage produced: the join result's staged parts and the timings."""

    parts: list[StagedPart]
    rows: int
    columns: list[str]
    loaded_rows: int
    load_seconds: float
    join_seconds: float


def srid_of(target_crs: str) -> int:
    """The PostGIS SRID of the manifest's target CRS (its EPSG code)."""
    epsg = CRS.from_user_input(target_crs).to_epsg()
    if epsg is None:
        raise LoadError(f"target_crs {target_crs!r} has no EPSG code; PostGIS needs an SRID")
    return epsg


def load_and_join(
    settings: PostGISSettings, store: ObjectStore, transformed: ChunkIndex, join: SpatialJoin,
    target_crs: str, schema: str, result_key: Callable[[int], str], *, copy_parallelism: int,
    copy_retries: int = 2, on_chunk: ChunkLoadedCallback | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> JoinedBatch:
    """Load ``transformed``'s layers into ``schema``, run ``join``, stage its result (part
    ``n`` at ``result_key(n)`` in the staging bucket), reconcile, and drop the schema."""
    srid = srid_of(target_crs)
    load_layer = partial(_load_layer, settings, store, transformed, schema, srid, join,
                         copy_parallelism, copy_retries, on_chunk or (lambda *_: None), log)
    indexes = {layer.layer: spatial_index_for(join, layer.layer, column_geometry_type(
        transformed.geometry_types.get(layer.layer, []))) for layer in transformed.layers}

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
                           for layer in transformed.layers if indexes[layer.layer] == "brin"}
                for layer in transformed.layers:
                    if layer.layer not in ordered:
                        tables[layer.layer] = load_layer(conn, layer, indexes[layer.layer])
                for name, future in ordered.items():
                    tables[name] = future.result()
            load_seconds = time.monotonic() - load_started
            join_started = time.monotonic()
            # end the implicit transaction the layers' counts left open, so that the join's
            # table commits (the export reads it on a connection of its own)
            conn.commit()
            result = run_spatial_join(conn, join, tables[join.left], tables[join.right])
            parts = export_table(conn, result, target_crs, store, transformed.staging_bucket,
                                 result_key)
            rows = sum(part.rows for part in parts)
            join_seconds = time.monotonic() - join_started
            log(f"join {join.name}: {rows:,} rows in {len(parts)} part(s), "
                f"{rows / join_seconds if join_seconds else 0:,.0f} features/s")
            reconcile_join(conn, join, tables[join.left], result, rows)
        except BaseException as error:
            final = _failed(error, schema, _drop_after_failure(conn, settings, schema, log))
            if final is error:
                raise
            raise final from error
        conn.rollback()
        drop_schema(conn, schema)
        log(f"dropped transient schema {schema}")
    return JoinedBatch(parts=parts, rows=rows, columns=[*result.attributes.names, "geometry"],
                       loaded_rows=transformed.rows, load_seconds=load_seconds,
                       join_seconds=join_seconds)


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
    join: SpatialJoin, copy_parallelism: int, copy_retries: int, on_chunk: ChunkLoadedCallback,
    log: Callable[[str], None], conn: psycopg.Connection, layer: LayerChunks,
    spatial_index: str | None,
) -> LayerTable:
    """Create the layer's typed table, COPY its chunks, index it for the join (the probed
    layer's ``spatial_index``; the primary key on the left layer only, which the join reads in
    ``_row_id`` order), reconcile counts. ``conn`` is this layer's alone while it loads.

    The first chunk is read here for the layer's columns (and then loaded as is); the loader's
    fetch thread reads the others, one per connection ahead of the COPYs.
    """
    if not layer.chunks:
        raise LoadError(f"layer {layer.layer!r} has no chunks to load; the transform stage "
                        "should have written at least one (possibly empty) chunk")
    staging = transformed.staging_bucket
    first = read_parquet_table(store.get_bytes(staging, layer.chunks[0].key))
    table = LayerTable(schema, layer.layer, attribute_schema(first), srid,
                       column_geometry_type(transformed.geometry_types.get(layer.layer, [])))
    parallelism = 1 if spatial_index == "brin" else copy_parallelism
    # the loader's own connections must see the table: end any implicit transaction (a
    # previous layer's count) so that CREATE TABLE commits instead of becoming a savepoint
    conn.commit()
    create_layer_table(conn, table)

    def fetch(key: str) -> pa.Table:
        return read_parquet_table(store.get_bytes(staging, key))

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
    keyed = layer.layer == join.left  # the join reads its left layer in _row_id order
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
