"""Shard op: stream the landed files of each layer into Hilbert-ordered GeoParquet chunks in the
run's staging prefix, and check every layer's recipe against its columns before any Ray task."""

import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import Config, MetadataValue, OpExecutionContext, Out, op
from pydantic import Field

from etl_pipelines.ops.validate import BatchPlan
from etl_pipelines.ray_metrics import StageProgress
from etl_pipelines.resources import ObjectStoreResource
from libs.chunk_index import ChunkIndex, SourceFile
from libs.errors import InputDataError
from libs.object_store import BackgroundPuts
from libs.sharding import ShardLimits, plan_layers, shard_layer
from libs.transformations import plan_recipe


class ShardConfig(Config):
    chunk_rows: int = Field(
        default=250_000, ge=1, le=10_000_000,
        description="rows per chunk (one Ray task each); 100k-1M suits 2-8 GiB workers",
    )
    chunk_megabytes: int = Field(
        default=128, ge=1, le=4096, description="upper bound of a chunk's in-memory size (MiB)")


@op(out=Out(ChunkIndex), tags={"stage": "shard"})
def shard_batch(
    context: OpExecutionContext, config: ShardConfig, plan: BatchPlan,
    object_store: ObjectStoreResource,
) -> ChunkIndex:
    store = object_store.store
    staging = object_store.staging_bucket
    manifest = plan.manifest
    limits = ShardLimits(chunk_rows=config.chunk_rows, chunk_bytes=config.chunk_megabytes * 2**20)
    started = time.monotonic()
    # chunks stream out as the sort emits them: their total is known once every layer is done
    progress = StageProgress(context.log.info, "shard", manifest.batch_id, None)
    layers, sources, types = [], [], {}
    # chunk writes overlap sorting and encoding the next chunks
    with tempfile.TemporaryDirectory(prefix="shard-") as scratch, \
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
                rows = pq.read_metadata(pa.BufferReader(data)).num_rows  # the footer only
                puts.put(staging, chunk_key, data, "application/vnd.apache.parquet",
                         then=lambda: progress.chunk_done(
                             layer, rows=rows, bytes_=len(data), detail=f"{layer} chunk {ordinal}"))
                return chunk_key

            layer_scratch = Path(scratch) / "spill" / layer_name
            layer_scratch.mkdir(parents=True)
            sharded = shard_layer(layer_name, layer_sources, sink, scratch_dir=layer_scratch,
                                  limits=limits)
            puts.wait()
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
    })
    return index
