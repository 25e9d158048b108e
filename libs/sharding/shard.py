"""The entry point :func:`shard_layer`: read, sort and write one layer, then reconcile counts."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from libs.descriptors import Chunk, LayerChunks
from libs.errors import ReconciliationError
from libs.sharding.collect import collect_layer
from libs.sharding.crs import crs_text
from libs.sharding.external_sort import sort_and_emit
from libs.sharding.limits import ShardLimits
from libs.sharding.sources import LayerSource
from libs.sharding.writer import ChunkSink, ChunkWriter


@dataclass
class ShardedLayer:
    """What sharding a layer produced: the chunk list handed to the next op, and facts."""

    chunks: LayerChunks
    schema: pa.Schema  # attribute columns + geometry (WKB)
    geometry_types: list[str]
    rows_per_source: dict[str, int]  # str(path) -> rows read, rejected ones included
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # (step, reason, JSON)

    @property
    def layer(self) -> str:
        return self.chunks.layer

    @property
    def rows(self) -> int:
        return self.chunks.rows


def shard_layer(layer: str, sources: list[LayerSource], sink: ChunkSink, *, scratch_dir: Path,
                limits: ShardLimits | None = None,
                on_chunk: Callable[[Chunk], None] | None = None,
                vertex_policy: str = "reject",
                on_schema: Callable[[pa.Schema], None] | None = None) -> ShardedLayer:
    """Shard every source of ``layer`` into Hilbert-ordered GeoParquet chunks handed to ``sink``.

    ``scratch_dir`` receives the spill files (removed as they are consumed); the caller owns
    the directory. ``on_chunk`` gets each chunk's index entry as soon as ``sink`` has taken
    it, while the next chunks are still being cut. A geometry over ``limits.max_vertices``
    is set apart in ``ShardedLayer.rejected`` (``vertex_policy`` 'reject') or fails ('fail').
    ``on_schema`` checks the first file's columns before any row is read.
    Raises :class:`InputDataError` for any
    problem with the input.
    """
    limits = limits or ShardLimits()
    if not sources:
        raise ValueError(f"layer {layer!r}: no sources to shard")
    work = Path(tempfile.mkdtemp(prefix=f"shard-{layer}-", dir=scratch_dir))
    try:
        collected = collect_layer(layer, sources, work, limits, vertex_policy, on_schema)
        writer = ChunkWriter(layer, collected.crs, collected.schema, sink, limits, on_chunk)
        try:
            sort_and_emit(collected, writer, work, limits)
        except BaseException:
            writer.abort()
            raise
        chunks = writer.finish()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if sum(c.rows for c in chunks) != collected.rows:
        raise ReconciliationError(f"layer {layer!r}: the chunks hold {sum(c.rows for c in chunks)} "
                                  f"rows but the sources {collected.rows}")
    return ShardedLayer(
        chunks=LayerChunks(layer=layer, crs=crs_text(collected.crs), chunks=chunks),
        schema=collected.schema, geometry_types=collected.geometry_types,
        rows_per_source=collected.rows_per_source, rejected=collected.rejected)
