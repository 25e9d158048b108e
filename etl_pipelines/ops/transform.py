"""Transform op: one Ray task per chunk running the layer's recipe, a bounded number in flight,
spread over the cluster's nodes, progress logged per chunk, counts reconciled per chunk and per
run (``libs.transformations.TransformResults``). Each task records its chunk's counts as Ray
application metrics (``etl_pipelines.ray.metrics``)."""

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import MetadataValue, OpExecutionContext, Out, op

from etl_pipelines.ray.metrics import StageProgress
from etl_pipelines.ray.submit import TaskSpec, run_bounded
from etl_pipelines.ray.tasks import transform_chunk, transform_spec
from etl_pipelines.resources import LedgerResource, ObjectStoreResource, RayResource
from etl_pipelines.types import BatchPlan
from libs.descriptors import Chunk, ChunkIndex, TransformedChunk
from libs.lake import run_prefix
from libs.manifest import Manifest
from libs.transformations import TransformResults, check_reject_fractions
from libs.transformations.chunk import REJECT_REASON, REJECT_STEP


@op(out=Out(ChunkIndex), tags={"stage": "transform"})
def transform_chunks(
    context: OpExecutionContext, plan: BatchPlan, sharded: ChunkIndex,
    object_store: ObjectStoreResource, ray_cluster: RayResource, ledger: LedgerResource,
) -> ChunkIndex:
    """Run each layer's recipe on its chunks as Ray tasks; rejected rows are kept apart."""
    manifest = plan.manifest
    tasks = [transform_spec(manifest, run_prefix(context.run_id), object_store.settings(),
                            sharded.staging_bucket, chunk)
             for layer in sharded.layers for chunk in layer.chunks]
    started = ray_cluster.take_early_tasks()  # chunks the shard op already started
    job_id = ray_cluster.job_id()
    if ray_cluster.dashboard_url:
        context.log.info(f"watch the tasks in the Ray dashboard: {ray_cluster.dashboard_url} "
                         f"(Ray job {job_id}, tasks transform:{manifest.batch_id}:<layer>:<n>)")
    results = TransformResults(sharded, manifest.target_crs)
    # the tasks record the metrics themselves, on the node that ran them
    progress = StageProgress(context.log.info, "transform", manifest.batch_id, len(tasks),
                             record=False)
    elapsed, memory = [0.0], [0.0, 0]  # seconds; highest peak RSS / request, highest peak

    def on_done(spec: TaskSpec, result: TransformedChunk, seconds: float) -> None:
        results.add(spec.args[3], result)
        elapsed[0] = seconds
        if result.peak_rss and spec.memory:
            memory[:] = max(memory[0], result.peak_rss / spec.memory), max(memory[1],
                                                                            result.peak_rss)
        progress.chunk_done(spec.args[3].layer, rows=result.rows_in, detail=(
            f"{spec.name}: {results.rows_out:,} out, {results.rows_rejected:,} rejected so far"))

    run_bounded(transform_chunk, tasks, max_in_flight=ray_cluster.max_tasks_in_flight,
                max_retries=ray_cluster.task_max_retries, on_done=on_done,
                scheduling_strategy=ray_cluster.scheduling_strategy, started=started,
                time_limit=ray_cluster.task_time_limit_seconds)
    # nothing after this stage runs on Ray: ending the run's Ray job frees its workers'
    # memory for PostgreSQL and unties load, join and publish from the head's life
    ray_cluster.disconnect()
    context.log.info(f"disconnected from Ray (job {job_id} ended): the transform was its last "
                     "use in this run")
    with ledger.releasing_pins_on_bad_input(context.run_id, manifest.batch_id):
        index = _checked(manifest, results, object_store)
    context.add_output_metadata({**_metadata(
        manifest, sharded, index, results, len(tasks), len(started), elapsed[0], ray_cluster,
        job_id), "peak_rss_of_memory_request": round(memory[0], 3),
        "peak_worker_rss_mib": round(memory[1] / 2**20)})
    return index


def _checked(manifest: Manifest, results: TransformResults,
             object_store: ObjectStoreResource) -> ChunkIndex:
    """The transformed index, or a failure (nothing published) when a layer's bad rows exceed
    its max_reject_fraction; the message lists the first problems, read from the rejects."""
    index = results.index()

    def problems_of(chunk: Chunk) -> list[tuple[str, str]]:
        data = object_store.store.get_bytes(index.staging_bucket, chunk.key)
        table = pq.read_table(pa.BufferReader(data), columns=[REJECT_STEP, REJECT_REASON])
        return list(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))

    check_reject_fractions(index, results.reject_reasons(), manifest.max_reject_fraction_for,
                           problems_of)
    return index


def _metadata(manifest: Manifest, sharded: ChunkIndex, index: ChunkIndex,
              results: TransformResults, chunks: int, started_early: int, seconds: float,
              ray_cluster: RayResource, job_id: str | None) -> dict:
    metadata = {
        "rows_in": sharded.rows,
        "rows_out": index.rows,
        "rows_rejected": sum(r.rows for r in index.rejects),
        "rejects_by_step": MetadataValue.json(results.reject_reasons()),
        "chunks": chunks,
        "chunks_started_during_shard": started_early,
        "rows_per_second": round(results.rows_in / seconds, 1) if seconds else 0.0,
        "crs": manifest.target_crs,
        "geometry_types": MetadataValue.json(index.geometry_types),
        "bbox": MetadataValue.json({x.layer: x.bbox for x in index.layers}),
        "recipes": MetadataValue.json({x.layer: [s.model_dump() for s in
                                                 manifest.recipe_for(x.layer)]
                                       for x in index.layers}),
    }
    if ray_cluster.dashboard_url:
        metadata["ray_dashboard"] = MetadataValue.url(ray_cluster.dashboard_url)
    if job_id is not None:
        metadata["ray_job_id"] = job_id
    return metadata
