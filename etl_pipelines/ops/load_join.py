"""Load + join op: COPY the layers into the run's transient schema, join, stream the result out.

The schema lives exactly as long as this op: it is created here and dropped in ``finally``
whatever happens, so a re-execution from a later step never depends on it. A run killed
outright is caught by the schema janitor sensor.
"""

import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import psycopg
import pyarrow as pa
from dagster import OpExecutionContext, Out, op
from pydantic import BaseModel, ConfigDict
from pyproj import CRS

from etl_pipelines.ops.validate import BatchPlan
from etl_pipelines.ray_metrics import StageProgress, record_stage
from etl_pipelines.resources import ObjectStoreResource, PostGISResource
from libs import postgis
from libs.descriptors import ChunkIndex, LayerChunks, StagedPart
from libs.errors import LoadError, ReconciliationError
from libs.geoparquet import read_parquet_table
from libs.lake import part_key, result_prefix
from libs.manifest import SpatialJoin
from libs.memory import release_memory, use_jemalloc_pool
from libs.object_store import ObjectStore

#: Extra attempts for a chunk whose connection broke mid-COPY (each on a fresh connection).
COPY_RETRIES = 2


class JoinResult(BaseModel):
    """The join result, staged as GeoParquet parts."""

    model_config = ConfigDict(frozen=True)

    name: str
    rows: int
    parts: list[StagedPart]
    columns: list[str]
    crs: str


def _srid(target_crs: str) -> int:
    epsg = CRS.from_user_input(target_crs).to_epsg()
    if epsg is None:
        raise LoadError(f"target_crs {target_crs!r} has no EPSG code; PostGIS needs an SRID")
    return epsg


@op(out=Out(JoinResult), tags={"stage": "load"})
def load_and_join(
    context: OpExecutionContext, plan: BatchPlan, transformed: ChunkIndex,
    object_store: ObjectStoreResource, postgis_db: PostGISResource,
) -> JoinResult:
    use_jemalloc_pool()  # as the shard op does: this op may run alone (re-execution)
    store = object_store.store
    staging = object_store.staging_bucket
    join = plan.manifest.join
    schema = postgis.run_schema_name(context.run_id)
    srid = _srid(plan.manifest.target_crs)
    tables: dict[str, postgis.LayerTable] = {}
    with postgis_db.connect() as conn:
        try:
            postgis.create_schema(conn, schema)
            context.log.info(f"created transient schema {schema}")
            load_started = time.monotonic()
            progress = StageProgress(context.log.info, "load", plan.manifest.batch_id,
                                     sum(len(layer.chunks) for layer in transformed.layers))
            indexes = {layer.layer: postgis.spatial_index_for(
                join, layer.layer, postgis.column_geometry_type(
                    transformed.geometry_types.get(layer.layer, [])))
                for layer in transformed.layers}
            load = partial(_load_layer, context, store=store, staging=staging,
                           postgis_db=postgis_db, transformed=transformed, schema=schema,
                           srid=srid, progress=progress, join=join)

            def load_beside(layer: LayerChunks) -> postgis.LayerTable:
                with postgis_db.connect() as own:
                    return load(own, layer, spatial_index=indexes[layer.layer])

            # A BRIN layer COPYs on one connection (its pages must keep the chunk order), which
            # leaves about a third of two cores idle: the other layers load beside it.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-ordered") as beside:
                ordered = {layer.layer: beside.submit(load_beside, layer)
                           for layer in transformed.layers if indexes[layer.layer] == "brin"}
                for layer in transformed.layers:
                    if layer.layer not in ordered:
                        tables[layer.layer] = load(conn, layer,
                                                   spatial_index=indexes[layer.layer])
                for name, future in ordered.items():
                    tables[name] = future.result()
            load_seconds = time.monotonic() - load_started
            join_started = time.monotonic()
            # end the implicit transaction the layers' counts left open, so that the join's
            # table commits (the export reads it on a connection of its own)
            conn.commit()
            result = postgis.run_spatial_join(conn, join, tables[join.left], tables[join.right])
            parts = postgis.export_table(
                conn, result, plan.manifest.target_crs, store, staging,
                partial(part_key, result_prefix(plan.staging_prefix, join.name)))
            rows = sum(part.rows for part in parts)
            join_seconds = time.monotonic() - join_started
            record_stage("join", plan.manifest.batch_id, join.name, features=rows,
                         bytes_=sum(part.bytes for part in parts), chunks=len(parts))
            context.log.info(f"join {join.name}: {rows:,} rows in {len(parts)} part(s), "
                             f"{rows / join_seconds if join_seconds else 0:,.0f} features/s")
            postgis.reconcile_join(conn, join, tables[join.left], result, rows)
        finally:
            conn.rollback()
            postgis.drop_schema(conn, schema)
            context.log.info(f"dropped transient schema {schema}")
    loaded_rows = transformed.rows
    context.add_output_metadata({
        "rows": rows,
        "loaded_rows": loaded_rows,
        "load_rows_per_second": round(loaded_rows / load_seconds, 1) if load_seconds else 0.0,
        "copy_parallelism": postgis_db.copy_parallelism,
        "join_seconds": round(join_seconds, 3),
        "predicate": join.predicate,
        "postgis_schema": schema,
    })
    return JoinResult(name=join.name, rows=rows, parts=parts,
                      columns=[*result.attributes.names, "geometry"], crs=plan.manifest.target_crs)


def _load_layer(
    context: OpExecutionContext, conn: psycopg.Connection, layer: LayerChunks, *,
    store: ObjectStore, staging: str, postgis_db: PostGISResource, transformed: ChunkIndex,
    schema: str, srid: int, progress: StageProgress, join: SpatialJoin,
    spatial_index: str | None,
) -> postgis.LayerTable:
    """Create the layer's typed table, COPY its chunks, index it for the join
    (``spatial_index``, from ``postgis.spatial_index_for``: the probed layer only; the
    primary key on the left layer only, which the join reads in ``_row_id`` order), reconcile
    counts. ``conn`` is this layer's alone while it loads.

    The first chunk is read here for the layer's columns (and then loaded as is); the others
    are fetched from the staging bucket by the loader's fetch thread, one per connection ahead
    of the COPYs, and loaded ``copy_parallelism`` at a time, each in its own transaction on its
    own connection. A layer that gets a BRIN index
    is COPYed by one connection, chunk after chunk, so that its pages keep the shard's
    Hilbert order.
    """
    if not layer.chunks:
        raise LoadError(f"layer {layer.layer!r} has no chunks to load; the transform stage "
                        "should have written at least one (possibly empty) chunk")
    first = read_parquet_table(store.get_bytes(staging, layer.chunks[0].key))
    table = postgis.LayerTable(
        schema, layer.layer, postgis.attribute_schema(first), srid,
        postgis.column_geometry_type(transformed.geometry_types.get(layer.layer, [])))
    parallelism = 1 if spatial_index == "brin" else postgis_db.copy_parallelism
    # the loader's own connections must see the table: end any implicit transaction (a
    # previous layer's count) so that CREATE TABLE commits instead of becoming a savepoint
    conn.commit()
    postgis.create_layer_table(conn, table)

    def fetch(key: str) -> pa.Table:
        return read_parquet_table(store.get_bytes(staging, key))

    held = [first]  # handed over once: the loader's worker then holds the only reference
    del first
    sources: list[postgis.ChunkSource] = [(layer.chunks[0].id_span, held.pop)]
    sources += [(c.id_span, partial(fetch, c.key)) for c in layer.chunks[1:]]

    chunk_bytes = {c.id_span: c.bytes for c in layer.chunks}

    def chunk_loaded(done: postgis.ChunkLoaded) -> None:
        start, end = done.id_span
        retried = f", after {done.attempts} attempts ({'; '.join(done.retried_errors)})" \
            if done.attempts > 1 else ""
        progress.chunk_done(layer.layer, rows=done.rows, bytes_=chunk_bytes.get(done.id_span, 0),
                            detail=f"layer {layer.layer}: _row_id {start}-{end - 1}, {done.rows} "
                            f"rows in {done.seconds:.2f}s{retried}")
        release_memory()

    copy_started = time.monotonic()
    copied = postgis.load_layer_chunks(
        postgis_db.settings(), table, sources, parallelism=parallelism,
        retries=COPY_RETRIES, on_chunk=chunk_loaded)
    copy_seconds = time.monotonic() - copy_started
    keyed = layer.layer == join.left  # the join reads its left layer in _row_id order
    index_started = time.monotonic()
    postgis.index_and_analyze(conn, table, spatial_index=spatial_index, primary_key=keyed)
    index_seconds = time.monotonic() - index_started
    loaded = postgis.count_rows(conn, schema, layer.layer)
    if loaded != layer.rows or copied != layer.rows:
        raise ReconciliationError(f"layer {layer.layer!r}: {layer.rows} rows transformed, "
                                  f"{copied} copied, {loaded} in the table")
    built = [*([spatial_index.upper()] if spatial_index else []),
             *(["primary key"] if keyed else []), "ANALYZE"]
    context.log.info(f"loaded layer {layer.layer}: {loaded} rows, COPY at "
                     f"{loaded / copy_seconds if copy_seconds else 0:,.0f} rows/s with "
                     f"{parallelism} connection(s), {' + '.join(built)} in {index_seconds:.1f}s")
    return table
