"""Shard op: stream the landed files of each layer into Hilbert-ordered GeoParquet chunks in the
run's staging prefix, and check every layer's recipe against its columns before any Ray task.

Chunks are written by background threads, and (``ShardConfig.transform_early``) each written
chunk's transform task starts on Ray at once, up to ``max_tasks_in_flight``: on a 2-core
machine the sort and encoding keep about one core busy, and the transform of the chunks
already cut takes the other. The transform op waits for these tasks and runs the rest."""

import tempfile
import time
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import Config, MetadataValue, OpExecutionContext, Out, op
from pydantic import Field

from etl_pipelines.ops.transform import transform_task
from etl_pipelines.ops.validate import BatchPlan
from etl_pipelines.ray_exec import EarlyTasks
from etl_pipelines.ray_metrics import StageProgress, transform_chunk_with_metrics
from etl_pipelines.resources import ObjectStoreResource, RayResource
from libs.descriptors import Chunk, ChunkIndex, SourceFile
from libs.errors import InputDataError
from libs.memory import release_memory, use_jemalloc_pool
from libs.object_store import BackgroundPuts
from libs.sharding import ShardLimits, plan_layers, shard_layer
from libs.transformations import plan_recipe


class ShardConfig(Config):
    chunk_rows: int = Field(
        default=250_000, ge=1, le=10_000_000,
        description="rows per chunk (one Ray task each); 100k-1M suits 2-8 GiB workers",
    )
    chunk_megabytes: int = Field(
        default=20, ge=1, le=4096, description="upper bound of a chunk's in-memory (Arrow) size "
        "in MiB, whatever its rows: a transform task holds several times its chunk (coordinates, "
        "validity checks, the encoded output), so this bounds a worker's memory for layers of "
        "heavy geometries; 20 keeps 250k points in one chunk and a worker's task within "
        "~150-200 MiB on top of its imports (8-512)")
    encode_threads: int = Field(
        default=1, ge=1, le=16, description="threads that key the external sort's rows and "
        "gather and encode chunks: 1 where the run shares its cores with the Ray workers (a "
        "second one added no throughput on 2 cores and held another chunk in memory, "
        "~100-170 MiB at 250k rows), more where the run worker has cores of its own")
    transform_early: bool = Field(
        default=True, description="start the transform of each chunk on Ray as soon as it is "
        "written, while the next chunks are cut (at most max_tasks_in_flight at once; the "
        "transform op runs the rest and waits for these)")


@contextmanager
def _early_transforms(enabled: bool, ray_cluster: RayResource, run_id: str):
    """EarlyTasks for the transform op, handed over when the shard op succeeds and cancelled
    when it fails."""
    early = EarlyTasks(transform_chunk_with_metrics, max_in_flight=ray_cluster.max_tasks_in_flight,
                       max_retries=ray_cluster.task_max_retries,
                       scheduling_strategy=ray_cluster.scheduling_strategy) if enabled else None
    try:
        yield early
    except BaseException:
        if early is not None:
            early.cancel()
        raise
    if early is not None:
        early.hand_over(run_id)


@op(out=Out(ChunkIndex), tags={"stage": "shard"})
def shard_batch(
    context: OpExecutionContext, config: ShardConfig, plan: BatchPlan,
    object_store: ObjectStoreResource, ray_cluster: RayResource,
) -> ChunkIndex:
    context.log.debug(f"Arrow memory pool of the run process: {use_jemalloc_pool()}")
    store = object_store.store
    settings = object_store.settings()
    staging = object_store.staging_bucket
    manifest = plan.manifest
    limits = ShardLimits(chunk_rows=config.chunk_rows, chunk_bytes=config.chunk_megabytes * 2**20,
                         encode_threads=config.encode_threads)
    started = time.monotonic()
    # chunks stream out as the sort emits them: their total is known once every layer is done
    progress = StageProgress(context.log.info, "shard", manifest.batch_id, None)
    layers, sources, types = [], [], {}
    written: dict[tuple[str, int], Future] = {}

    def start_transform(chunk: Chunk) -> None:
        """Offer the chunk's transform task to Ray once its object is written."""
        spec = transform_task(plan, settings, staging, chunk)

        def offer(write: Future) -> None:
            if write.exception() is None and early is not None:
                try:
                    early.offer(spec)
                except Exception as exc:  # the transform op runs it then
                    context.log.warning(f"could not start {spec.name} early: {exc}")

        written.pop((chunk.layer, chunk.ordinal)).add_done_callback(offer)

    # chunk writes overlap sorting and encoding the next chunks, and (transform_early) each
    # written chunk's transform starts on Ray at once
    with _early_transforms(config.transform_early, ray_cluster, context.run_id) as early, \
            tempfile.TemporaryDirectory(prefix="shard-") as scratch, \
            BackgroundPuts(store, threads=2, max_pending=3) as puts:
        landed = Path(scratch) / "landed"
        landed.mkdir()
        downloads = []
        checksums: dict[Path, tuple[str, str, int]] = {}
        for number, data_file in enumerate(manifest.files):
            key = plan.landing_key(data_file.path)
            # a numbered folder per file keeps names (and a Shapefile zip's siblings) apart
            local = landed / str(number) / Path(data_file.path).name
            local.parent.mkdir()
            sha256 = store.download(object_store.landing_bucket, key, local)
            checksums[local] = (key, sha256, local.stat().st_size)
            downloads.append((local, data_file))
        planned = plan_layers(downloads)
        for side in ("left", "right"):
            name = getattr(manifest.join, side)
            if name not in planned:
                raise InputDataError(
                    f"batch {manifest.batch_id!r}: join.{side} names layer {name!r} but the "
                    f"files feed {sorted(planned)}")
        for layer_name, layer_sources in planned.items():

            def sink(ordinal: int, data: bytes, layer: str = layer_name) -> str:
                chunk_key = f"{plan.staging_prefix}chunks/{layer}/chunk-{ordinal:05d}.parquet"
                footer = pq.read_metadata(pa.BufferReader(data))  # the footer only
                rows = footer.num_rows
                if ordinal == 0:  # the layer's recipe fits its columns, before any Ray task
                    plan_recipe(manifest.recipe_for(layer), pq.read_schema(pa.BufferReader(data)),
                                manifest.target_crs)
                written[(layer, ordinal)] = puts.put(
                    staging, chunk_key, data, "application/vnd.apache.parquet",
                    then=lambda: progress.chunk_done(
                        layer, rows=rows, bytes_=len(data), detail=f"{layer} chunk {ordinal}"))
                return chunk_key

            layer_scratch = Path(scratch) / "spill" / layer_name
            layer_scratch.mkdir(parents=True)
            sharded = shard_layer(layer_name, layer_sources, sink, scratch_dir=layer_scratch,
                                  limits=limits, on_chunk=start_transform)
            puts.wait()
            release_memory()  # the sort's buffers, before the next layer and the load op
            plan_recipe(manifest.recipe_for(layer_name), sharded.schema, manifest.target_crs)
            layers.append(sharded.chunks)
            types[layer_name] = list(sharded.geometry_types)
            for source in layer_sources:
                key, sha256, size = checksums[source.path]
                sources.append(SourceFile(
                    bucket=object_store.landing_bucket, key=key, sha256=sha256, size=size,
                    layer=layer_name, rows=sharded.rows_per_source[str(source.path)]))
            context.log.info(
                f"sharded layer {layer_name}: {sharded.chunks.rows:,} rows from "
                f"{len(layer_sources)} source(s) into {len(sharded.chunks.chunks)} chunk(s), "
                f"{(time.monotonic() - started):.1f}s so far")
    index = ChunkIndex(batch_id=manifest.batch_id, staging_bucket=staging,
                       prefix=plan.staging_prefix, layers=layers, sources=sources,
                       geometry_types=types)
    seconds = time.monotonic() - started
    progress.total = progress.done
    context.log.info(progress.line())
    context.add_output_metadata({
        "rows": index.rows,
        "chunks": sum(len(layer.chunks) for layer in layers),
        "rows_per_layer": MetadataValue.json({x.layer: x.rows for x in layers}),
        "rows_per_second": round(index.rows / seconds, 1) if seconds else 0.0,
        "landed_bytes": sum(size for _, _, size in checksums.values()),
        "geometry_types": MetadataValue.json(types),
        "crs": MetadataValue.json({x.layer: x.crs for x in layers}),
        "transforms_started": early.count if early is not None else 0,
    })
    return index
