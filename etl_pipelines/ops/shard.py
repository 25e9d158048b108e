"""Shard op: stream the landed files of each layer into Hilbert-ordered GeoParquet chunks in the
run's staging prefix (``libs.sharding.shard_batch``), checking every layer's recipe against its
columns before any Ray task.

With ``transform_early``, each written chunk's transform starts on Ray at once, up to
``max_tasks_in_flight``: on a 2-core machine the sort and encoding keep about one core busy,
and the transform of the chunks already cut takes the other. The Ray resource hands those
tasks to the transform op, which waits for them and runs the rest."""

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pyarrow as pa
from dagster import Config, MetadataValue, OpExecutionContext, Out, op
from pydantic import Field

from etl_pipelines.ray.metrics import StageProgress
from etl_pipelines.ray.submit import EarlyTasks
from etl_pipelines.ray.tasks import transform_chunk, transform_spec
from etl_pipelines.resources import (
    LedgerResource,
    ObjectStoreResource,
    RayResource,
    ScratchResource,
)
from etl_pipelines.types import BatchPlan
from libs.descriptors import Chunk, ChunkIndex
from libs.errors import InputDataError
from libs.geoparquet import GEOMETRY
from libs.lake import chunk_key, run_prefix
from libs.manifest import Manifest
from libs.memory import use_jemalloc_pool
from libs.postgis import ROW_ID, join_load_problem
from libs.sharding import (
    ShardedLayer,
    ShardLimits,
    check_scratch_space,
    download_landed,
    run_scratch,
    shard_landed_batch,
)
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
    max_file_bytes: int = Field(
        default=ShardLimits.max_file_bytes, ge=1, description="a landed file larger than this "
        "is refused, naming it, before any file is downloaded (8 GiB: what a 2-core worker "
        "shards in well under an hour with room for its spill on a modest scratch disk)")
    max_vertices: int = Field(
        default=ShardLimits.max_vertices, ge=4, description="vertices per geometry: a row over "
        "it is rejected ('vertex_limit', with its file and 1-based row) or fails the run when "
        "the layer's make_valid policy is 'fail'; counted before any other geometry work")
    read_batch_megabytes: int = Field(
        default=ShardLimits.read_batch_bytes // 2**20, ge=1, le=4096, description="in-memory "
        "bound of one read batch in MiB (batches of heavy rows are cut smaller)")
    transform_early: bool = Field(
        default=True, description="start the transform of each chunk on Ray as soon as it is "
        "written, while the next chunks are cut (at most max_tasks_in_flight at once; the "
        "transform op runs the rest and waits for these)")


@op(out=Out(ChunkIndex), tags={"stage": "shard"})
def shard_batch(
    context: OpExecutionContext, config: ShardConfig, plan: BatchPlan,
    object_store: ObjectStoreResource, ray_cluster: RayResource, scratch: ScratchResource,
    ledger: LedgerResource,
) -> ChunkIndex:
    context.log.debug(f"Arrow memory pool of the run process: {use_jemalloc_pool()}")
    manifest, store, staging = plan.manifest, object_store.store, object_store.staging_bucket
    # the run's own prefix, not the plan's: a re-execution reuses the plan of the run it
    # re-executes, and two of them must not write (and clean up) the same keys
    prefix, started = run_prefix(context.run_id), time.monotonic()
    # chunks stream out as the sort emits them: their total is known once every layer is done
    progress = StageProgress(context.log.info, "shard", manifest.batch_id, None)

    def sharded_layer(sharded: ShardedLayer) -> None:
        context.log.info(
            f"sharded layer {sharded.layer}: {sharded.chunks.rows:,} rows from "
            f"{len(sharded.rows_per_source)} source(s) into {len(sharded.chunks.chunks)} "
            f"chunk(s), {(time.monotonic() - started):.1f}s so far")

    with ledger.releasing_pins_on_bad_input(context.run_id, manifest.batch_id), \
            ray_cluster.early_tasks(transform_chunk, enabled=config.transform_early) as early, \
            run_scratch(scratch.root(), context.run_id) as scratch_dir:
        landed = download_landed(store, object_store.landing_bucket, plan.folder, manifest.files,
                                 scratch_dir / "landed", max_file_bytes=config.max_file_bytes,
                                 check_space=_space_check(context, scratch, scratch_dir, plan),
                                 pins=plan.pins())
        index = shard_landed_batch(
            store, manifest, landed, landing_bucket=object_store.landing_bucket,
            staging_bucket=staging, staging_prefix=prefix,
            chunk_key=partial(chunk_key, prefix, "chunks"), scratch=scratch_dir,
            rejects_key=partial(chunk_key, prefix, "rejects"),
            limits=_limits(config), check_schema=partial(_check_schema, manifest),
            on_layer=sharded_layer,
            on_staged=partial(_chunk_staged, context, progress, early, plan, object_store))
    progress.total = progress.done
    context.log.info(progress.line())
    context.add_output_metadata(_metadata(index, landed, time.monotonic() - started, early))
    return index


def _check_schema(manifest: Manifest, layer: str, schema: pa.Schema) -> None:
    """Before any chunk of ``layer`` is offered: its recipe fits its columns, and what its
    joins load of it fits in a PostgreSQL table (a wide layer otherwise failed in PostgreSQL
    after the transform)."""
    planned = plan_recipe(manifest.recipe_for(layer), schema, manifest.target_crs)
    attributes = [name for name in planned.names if name not in (ROW_ID, GEOMETRY)]
    problem = join_load_problem(manifest.spatial_joins, layer, attributes)
    if problem is not None:
        raise InputDataError(f"batch {manifest.batch_id!r}: {problem}")


def _space_check(context: OpExecutionContext, scratch: ScratchResource, directory: Path,
                 plan: BatchPlan) -> Callable[[list[tuple[str, int]]], None]:
    """Called with the landed files' (format, size) before any is downloaded."""

    def check(files: list[tuple[str, int]]) -> None:
        free = check_scratch_space(directory, files, factor=scratch.space_factor,
                                   compressed_factor=scratch.compressed_space_factor,
                                   reserve_bytes=scratch.reserve_megabytes * 2**20,
                                   batch_id=plan.manifest.batch_id)
        context.log.info(f"scratch {directory}: {free:,} bytes free for "
                         f"{sum(size for _, size in files):,} landed bytes")

    return check


def _limits(config: ShardConfig) -> ShardLimits:
    return ShardLimits(chunk_rows=config.chunk_rows, encode_threads=config.encode_threads,
                       chunk_bytes=config.chunk_megabytes * 2**20,
                       max_file_bytes=config.max_file_bytes, max_vertices=config.max_vertices,
                       read_batch_bytes=config.read_batch_megabytes * 2**20)


def _chunk_staged(context: OpExecutionContext, progress: StageProgress, early: EarlyTasks | None,
                  plan: BatchPlan, object_store: ObjectStoreResource, chunk: Chunk) -> None:
    """Count a written chunk and offer its transform to Ray (it runs in the transform op when
    the offer is declined or fails)."""
    progress.chunk_done(chunk.layer, rows=chunk.rows, bytes_=chunk.bytes,
                        detail=f"{chunk.layer} chunk {chunk.ordinal}")
    if early is None:
        return
    spec = transform_spec(plan.manifest, run_prefix(context.run_id), object_store.settings(),
                          object_store.staging_bucket, chunk)
    try:
        early.offer(spec)
    except Exception as exc:
        context.log.warning(f"could not start {spec.name} early: {exc}")


def _metadata(index: ChunkIndex, landed: list, seconds: float, early: EarlyTasks | None) -> dict:
    return {
        "rows": index.rows,
        "chunks": sum(len(layer.chunks) for layer in index.layers),
        "rows_per_layer": MetadataValue.json({x.layer: x.rows for x in index.layers}),
        "rows_per_second": round(index.rows / seconds, 1) if seconds else 0.0,
        "landed_bytes": sum(file.size for file in landed),
        "geometry_types": MetadataValue.json(index.geometry_types),
        "crs": MetadataValue.json({x.layer: x.crs for x in index.layers}),
        "transforms_started": early.count if early is not None else 0,
        "rows_over_vertex_limit": sum(x.get("vertex_limit", 0)
                                      for x in index.shard_reject_steps.values()),
        "rows_unreadable": sum(x.get("read", 0) for x in index.shard_reject_steps.values()),
    }
