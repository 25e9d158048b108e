"""Shard op: stream each landed file into GeoParquet chunks in the run's staging prefix."""

import tempfile
import time
from pathlib import Path

from dagster import Config, MetadataValue, OpExecutionContext, Out, op
from pydantic import Field

from etl_pipelines.ops.validate import BatchPlan
from etl_pipelines.resources import ObjectStoreResource
from libs.chunk_index import Chunk, ChunkIndex, LayerChunks, SourceFile
from libs.sharding import shard_to_geoparquet


class ShardConfig(Config):
    chunk_rows: int = Field(
        default=250_000, ge=1, le=10_000_000,
        description="rows per chunk (one Ray task each); 100k-1M suits 2-8 GiB workers",
    )


@op(out=Out(ChunkIndex), tags={"stage": "shard"})
def shard_batch(
    context: OpExecutionContext, config: ShardConfig, plan: BatchPlan,
    object_store: ObjectStoreResource,
) -> ChunkIndex:
    store = object_store.store
    staging = object_store.staging_bucket
    started = time.monotonic()
    per_layer: dict[str, list[Chunk]] = {}
    sources: list[SourceFile] = []
    with tempfile.TemporaryDirectory(prefix="shard-") as scratch:
        for data_file in plan.manifest.files:
            key = plan.landing_key(data_file.path)
            local = Path(scratch) / Path(data_file.path).name
            sha256 = store.download(object_store.landing_bucket, key, local)
            size = local.stat().st_size
            previous = per_layer.setdefault(data_file.layer, [])

            def sink(ordinal: int, data: bytes, layer: str = data_file.layer) -> str:
                chunk_key = f"{plan.staging_prefix}chunks/{layer}/chunk-{ordinal:05d}.parquet"
                store.put_bytes(staging, chunk_key, data, "application/vnd.apache.parquet")
                return chunk_key

            chunks = shard_to_geoparquet(
                local, data_file, sink, chunk_rows=config.chunk_rows,
                first_ordinal=len(previous), first_row=sum(c.rows for c in previous))
            previous.extend(chunks)
            rows = sum(c.rows for c in chunks)
            sources.append(SourceFile(bucket=object_store.landing_bucket, key=key, sha256=sha256,
                                      size=size, layer=data_file.layer, rows=rows))
            local.unlink()
            context.log.info(f"sharded {key}: {rows} rows into {len(chunks)} chunk(s)")
    layers = [LayerChunks(layer=name, crs=chunks[0].crs, chunks=chunks)
              for name, chunks in per_layer.items()]
    index = ChunkIndex(batch_id=plan.manifest.batch_id, staging_bucket=staging,
                       prefix=plan.staging_prefix, layers=layers, sources=sources)
    seconds = time.monotonic() - started
    context.add_output_metadata({
        "rows": index.rows,
        "chunks": sum(len(layer.chunks) for layer in layers),
        "rows_per_layer": MetadataValue.json({x.layer: x.rows for x in layers}),
        "rows_per_second": round(index.rows / seconds, 1) if seconds else 0.0,
        "landed_bytes": sum(s.size for s in sources),
    })
    return index
