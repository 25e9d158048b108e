"""Load + join op: the PostGIS stage of the batch (``libs.postgis.load_and_join``): COPY the
layers into the run's transient schema, join, stage the result, drop the schema whatever
happens (a run killed outright is caught by the schema janitor sensor)."""

from functools import partial

from dagster import OpExecutionContext, Out, op

from etl_pipelines.ray.metrics import StageProgress, record_stage
from etl_pipelines.resources import ObjectStoreResource, PostGISResource
from etl_pipelines.types import BatchPlan, JoinResult
from libs.descriptors import ChunkIndex
from libs.lake import part_key, result_prefix, run_prefix
from libs.memory import use_jemalloc_pool
from libs.postgis import ChunkLoaded, run_schema_name
from libs.postgis import load_and_join as load_and_join_batch

#: Extra attempts for a chunk whose connection broke mid-COPY (each on a fresh connection).
COPY_RETRIES = 2


@op(out=Out(JoinResult), tags={"stage": "load"})
def load_and_join(
    context: OpExecutionContext, plan: BatchPlan, transformed: ChunkIndex,
    object_store: ObjectStoreResource, postgis_db: PostGISResource,
) -> JoinResult:
    use_jemalloc_pool()  # as the shard op does: this op may run alone (re-execution)
    manifest, join = plan.manifest, plan.manifest.join
    schema = run_schema_name(context.run_id)
    progress = StageProgress(context.log.info, "load", manifest.batch_id,
                             sum(len(layer.chunks) for layer in transformed.layers))

    def chunk_loaded(layer: str, done: ChunkLoaded, staged_bytes: int) -> None:
        progress.chunk_done(layer, rows=done.rows, bytes_=staged_bytes,
                            detail=f"layer {layer}: {done.describe()}")

    joined = load_and_join_batch(
        postgis_db.settings(), object_store.store, transformed, join, manifest.target_crs,
        schema, partial(part_key, result_prefix(run_prefix(context.run_id), join.name)),
        copy_parallelism=postgis_db.copy_parallelism, copy_retries=COPY_RETRIES,
        on_chunk=chunk_loaded, log=context.log.info)
    record_stage("join", manifest.batch_id, join.name, features=joined.rows,
                 bytes_=sum(part.bytes for part in joined.parts), chunks=len(joined.parts))
    context.add_output_metadata({
        "rows": joined.rows,
        "loaded_rows": joined.loaded_rows,
        "load_rows_per_second": round(joined.loaded_rows / joined.load_seconds, 1)
        if joined.load_seconds else 0.0,
        "copy_parallelism": postgis_db.copy_parallelism,
        "join_seconds": round(joined.join_seconds, 3),
        "predicate": join.predicate,
        "postgis_schema": schema,
    })
    return JoinResult(name=join.name, rows=joined.rows, parts=joined.parts,
                      columns=joined.columns, crs=manifest.target_crs)
