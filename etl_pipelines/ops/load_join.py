"""Load + join op: the PostGIS stage of the batch (``libs.postgis.load_and_join``): COPY the
layers the joins read into the run's transient schema, run each join, stage each result, drop
the schema whatever happens (a run killed outright is caught by the schema janitor sensor).

A batch without a join skips PostGIS altogether (no schema, no connection): nothing there
would be read, and ingesting a layer should not wait on, or fail with, a database it does not
use. The layers go to the lake from the transform's staged chunks either way.
"""

from dagster import OpExecutionContext, Out, op

from etl_pipelines.ray.metrics import StageProgress, record_stage
from etl_pipelines.resources import ObjectStoreResource, PostGISResource
from etl_pipelines.types import BatchPlan, JoinResult, JoinResults
from libs.descriptors import ChunkIndex, LayerChunks
from libs.lake import part_key, result_prefix, run_prefix
from libs.manifest import SpatialJoin
from libs.memory import use_jemalloc_pool
from libs.postgis import ChunkLoaded, JoinedBatch, loaded_columns, run_schema_name
from libs.postgis import load_and_join as load_and_join_batch

#: Extra attempts for a chunk whose connection broke mid-COPY (each on a fresh connection).
COPY_RETRIES = 2


@op(out=Out(JoinResults), tags={"stage": "load"})
def load_and_join(
    context: OpExecutionContext, plan: BatchPlan, transformed: ChunkIndex,
    object_store: ObjectStoreResource, postgis_db: PostGISResource,
) -> JoinResults:
    use_jemalloc_pool()  # as the shard op does: this op may run alone (re-execution)
    manifest, joins = plan.manifest, plan.manifest.spatial_joins
    if not joins:
        context.log.info(f"batch {manifest.batch_id} declares no join: PostGIS is not used")
        context.add_output_metadata({"joins": 0, "rows": 0, "loaded_rows": 0})
        return JoinResults()
    schema = run_schema_name(context.run_id)
    loaded = [layer for layer in transformed.layers
              if any(layer.layer in (j.left, j.right) for j in joins)]
    progress = StageProgress(context.log.info, "load", manifest.batch_id,
                             sum(len(layer.chunks) for layer in loaded))

    def chunk_loaded(layer: str, done: ChunkLoaded, staged_bytes: int) -> None:
        progress.chunk_done(layer, rows=done.rows, bytes_=staged_bytes,
                            detail=f"layer {layer}: {done.describe()}")

    staged = run_prefix(context.run_id)
    joined = load_and_join_batch(
        postgis_db.settings(), object_store.store, transformed, joins, manifest.target_crs,
        schema, lambda name, n: part_key(result_prefix(staged, name), n),
        copy_parallelism=postgis_db.copy_parallelism, copy_retries=COPY_RETRIES,
        on_chunk=chunk_loaded, log=context.log.info)
    for output in joined.joins:
        record_stage("join", manifest.batch_id, output.name, features=output.rows,
                     bytes_=sum(part.bytes for part in output.parts), chunks=len(output.parts))
    context.add_output_metadata(_metadata(joined, joins, loaded, schema,
                                          postgis_db.copy_parallelism))
    return JoinResults(joins=[JoinResult(name=o.name, rows=o.rows, parts=o.parts,
                                         columns=o.columns, crs=manifest.target_crs)
                              for o in joined.joins])


def _metadata(joined: JoinedBatch, joins: list[SpatialJoin], loaded: list[LayerChunks],
              schema: str, copy_parallelism: int) -> dict:
    return {
        "joins": len(joined.joins),
        "rows": sum(output.rows for output in joined.joins),
        "rows_per_join": {output.name: output.rows for output in joined.joins},
        "loaded_rows": joined.loaded_rows,
        "loaded_columns": {layer.layer: "all" if (c := loaded_columns(joins, layer.layer)) is None
                           else len(c) for layer in loaded},
        "load_rows_per_second": round(joined.loaded_rows / joined.load_seconds, 1)
        if joined.load_seconds else 0.0,
        "copy_parallelism": copy_parallelism,
        "join_seconds": round(joined.join_seconds, 3),
        "predicates": ", ".join(join.predicate for join in joins),
        "postgis_schema": schema,
    }
