"""Transform op: one Ray task per chunk, a bounded number in flight, progress logged per chunk."""

import time

from dagster import MetadataValue, OpExecutionContext, Out, op

from etl_pipelines.ops.validate import BatchPlan
from etl_pipelines.resources import ObjectStoreResource, RayResource
from libs.chunk_index import Chunk, ChunkIndex, LayerChunks
from libs.errors import ReconciliationError
from libs.transformations import transform_staged_chunk


@op(out=Out(ChunkIndex), tags={"stage": "transform"})
def transform_chunks(
    context: OpExecutionContext, plan: BatchPlan, sharded: ChunkIndex,
    object_store: ObjectStoreResource, ray_cluster: RayResource,
) -> ChunkIndex:
    """Reproject to the target CRS and repair invalid geometries, chunk by chunk on Ray."""
    import ray

    task = ray.remote(transform_staged_chunk)
    settings = object_store.settings()
    batch_id = plan.manifest.batch_id
    todo = [c for layer in sharded.layers for c in layer.chunks]
    total = len(todo)
    started = time.monotonic()
    pending: dict = {}
    done: list[Chunk] = []
    rows_done = 0
    if ray_cluster.dashboard_url:
        context.log.info(f"watch the tasks in the Ray dashboard: {ray_cluster.dashboard_url}")
    while todo or pending:
        while todo and len(pending) < ray_cluster.max_tasks_in_flight:
            chunk = todo.pop(0)
            out_key = f"{plan.staging_prefix}transformed/{chunk.layer}/chunk-{chunk.ordinal:05d}.parquet"
            ref = task.options(
                name=f"transform:{batch_id}:{chunk.layer}:{chunk.ordinal:05d}", num_cpus=1,
                max_retries=ray_cluster.task_max_retries, retry_exceptions=[OSError],
            ).remote(settings, sharded.staging_bucket, chunk, out_key, plan.manifest.target_crs)
            pending[ref] = chunk
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            source = pending.pop(ref)
            result: Chunk = ray.get(ref)
            if result.rows != source.rows:
                raise ReconciliationError(
                    f"batch {batch_id!r}, layer {source.layer!r}, chunk {source.ordinal}: "
                    f"{source.rows} rows in but {result.rows} out")
            done.append(result)
            rows_done += result.rows
            elapsed = time.monotonic() - started
            context.log.info(
                f"transform {len(done)}/{total} chunks, {rows_done} rows, "
                f"{rows_done / elapsed:,.0f} features/s")
    layers = [
        LayerChunks(layer=layer.layer, crs=plan.manifest.target_crs,
                    chunks=sorted((c for c in done if c.layer == layer.layer),
                                  key=lambda c: c.ordinal))
        for layer in sharded.layers
    ]
    index = ChunkIndex(batch_id=batch_id, staging_bucket=sharded.staging_bucket,
                       prefix=sharded.prefix, layers=layers, sources=sharded.sources)
    if index.rows != sharded.rows:
        raise ReconciliationError(f"batch {batch_id!r}: {sharded.rows} rows sharded but "
                                  f"{index.rows} transformed")
    seconds = time.monotonic() - started
    metadata = {
        "rows": index.rows,
        "chunks": total,
        "rows_per_second": round(index.rows / seconds, 1) if seconds else 0.0,
        "crs": plan.manifest.target_crs,
        "bbox": MetadataValue.json({x.layer: x.bbox for x in layers}),
    }
    if ray_cluster.dashboard_url:
        metadata["ray_dashboard"] = MetadataValue.url(ray_cluster.dashboard_url)
    context.add_output_metadata(metadata)
    return index
