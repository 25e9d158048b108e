"""Transform op: one Ray task per chunk running the layer's recipe, a bounded number in flight,
spread over the cluster's nodes, progress logged per chunk, counts reconciled per chunk and per
run. Each task records its chunk's counts as Ray application metrics (etl_pipelines.ray_metrics).
"""

from dagster import MetadataValue, OpExecutionContext, Out, op

from etl_pipelines.ops.validate import BatchPlan
from etl_pipelines.ray_exec import TaskSpec, retire_workers, run_bounded, take_started
from etl_pipelines.ray_metrics import StageProgress, transform_chunk_with_metrics
from etl_pipelines.resources import ObjectStoreResource, RayResource
from libs.descriptors import Chunk, ChunkIndex, LayerChunks, TransformedChunk
from libs.errors import ReconciliationError
from libs.object_store import ObjectStoreSettings


def transform_task(plan: BatchPlan, settings: ObjectStoreSettings, bucket: str,
                   chunk: Chunk) -> TaskSpec:
    """The Ray task that transforms one sharded chunk (named for the dashboard)."""
    manifest = plan.manifest
    stem = f"{plan.staging_prefix}{{}}/{chunk.layer}/chunk-{chunk.ordinal:05d}.parquet"
    return TaskSpec(
        name=f"transform:{manifest.batch_id}:{chunk.layer}:{chunk.ordinal:05d}",
        args=(manifest.batch_id, settings, bucket, chunk, stem.format("transformed"),
              stem.format("rejects"), manifest.recipe_for(chunk.layer), manifest.target_crs))


@op(out=Out(ChunkIndex), tags={"stage": "transform"})
def transform_chunks(
    context: OpExecutionContext, plan: BatchPlan, sharded: ChunkIndex,
    object_store: ObjectStoreResource, ray_cluster: RayResource,
) -> ChunkIndex:
    """Run each layer's recipe on its chunks as Ray tasks; rejected rows are kept apart."""
    manifest = plan.manifest
    batch_id = manifest.batch_id
    settings = object_store.settings()
    tasks = [transform_task(plan, settings, sharded.staging_bucket, chunk)
             for layer in sharded.layers for chunk in layer.chunks]
    # chunks the shard op already started (ShardConfig.transform_early), in this process
    started = take_started(context.run_id)
    sources = {(c.layer, c.ordinal): c for layer in sharded.layers for c in layer.chunks}
    results: dict[tuple[str, int], TransformedChunk] = {}
    totals = {"in": 0, "out": 0, "rejected": 0, "seconds": 0.0}
    job_id = ray_cluster.job_id()
    if ray_cluster.dashboard_url:
        context.log.info(f"watch the tasks in the Ray dashboard: {ray_cluster.dashboard_url} "
                         f"(Ray job {job_id}, tasks named transform:{batch_id}:<layer>:<chunk>)")
    # the tasks record the metrics themselves, on the node that ran them
    progress = StageProgress(context.log.info, "transform", batch_id, len(tasks), record=False)

    def on_done(spec: TaskSpec, result: TransformedChunk, elapsed: float) -> None:
        source: Chunk = spec.args[3]
        rejected = result.rejects.rows if result.rejects else 0
        if result.rows_in != source.rows or result.chunk.rows + rejected != source.rows:
            raise ReconciliationError(
                f"batch {batch_id!r}, layer {source.layer!r}, chunk {source.ordinal}: "
                f"{source.rows} rows sharded, {result.rows_in} read, {result.chunk.rows} out, "
                f"{rejected} rejected")
        results[(source.layer, source.ordinal)] = result
        totals["in"] += result.rows_in
        totals["out"] += result.chunk.rows
        totals["rejected"] += rejected
        totals["seconds"] = elapsed
        progress.chunk_done(source.layer, rows=result.rows_in, detail=(
            f"{spec.name}: {totals['out']:,} out, {totals['rejected']:,} rejected so far"))

    run_bounded(transform_chunk_with_metrics, tasks,
                max_in_flight=ray_cluster.max_tasks_in_flight,
                max_retries=ray_cluster.task_max_retries, on_done=on_done,
                scheduling_strategy=ray_cluster.scheduling_strategy, started=started)
    # nothing after this stage runs on Ray: the job's idle workers would only hold memory
    retired = retire_workers(scheduling_strategy=ray_cluster.scheduling_strategy)
    context.log.debug(f"retired {len(retired)} idle Ray worker(s) of job {job_id}")
    if sorted(results) != sorted(sources):
        raise ReconciliationError(f"batch {batch_id!r}: {len(sources)} chunks sharded but "
                                  f"{len(results)} transformed")
    layers, rejects, reasons, types = [], [], {}, {}
    for layer in sharded.layers:
        done = [results[(layer.layer, c.ordinal)] for c in layer.chunks]
        layers.append(LayerChunks(layer=layer.layer, crs=manifest.target_crs, chunks=[
            r.chunk.model_copy(update={"source_rows": r.rows_in}) for r in done]))
        layer_rejects = [r.rejects for r in done if r.rejects is not None]
        if layer_rejects:
            rejects.append(LayerChunks(layer=layer.layer, crs=layer.crs, chunks=layer_rejects))
        reasons[layer.layer] = {}
        for r in done:
            for reason, count in r.reject_reasons.items():
                reasons[layer.layer][reason] = reasons[layer.layer].get(reason, 0) + count
        types[layer.layer] = sorted({t for r in done for t in r.geometry_types})
    index = ChunkIndex(batch_id=batch_id, staging_bucket=sharded.staging_bucket,
                       prefix=sharded.prefix, layers=layers, sources=sharded.sources,
                       rejects=rejects, geometry_types=types)
    rows_rejected = sum(r.rows for r in rejects)
    if sharded.rows != index.rows + rows_rejected:
        raise ReconciliationError(
            f"batch {batch_id!r}: {sharded.rows} rows sharded but {index.rows} transformed + "
            f"{rows_rejected} rejected")
    metadata = {
        "rows_in": sharded.rows,
        "rows_out": index.rows,
        "rows_rejected": rows_rejected,
        "rejects_by_step": MetadataValue.json(reasons),
        "chunks": len(tasks),
        "chunks_started_during_shard": len(started),
        "rows_per_second": round(totals["in"] / totals["seconds"], 1) if totals["seconds"] else 0.0,
        "crs": manifest.target_crs,
        "geometry_types": MetadataValue.json(types),
        "bbox": MetadataValue.json({x.layer: x.bbox for x in layers}),
        "recipes": MetadataValue.json({x.layer: [s.model_dump() for s in
                                                 manifest.recipe_for(x.layer)] for x in layers}),
    }
    if ray_cluster.dashboard_url:
        metadata["ray_dashboard"] = MetadataValue.url(ray_cluster.dashboard_url)
    if job_id is not None:
        metadata["ray_job_id"] = job_id
    context.add_output_metadata(metadata)
    return index
