"""Sharding one landed batch into the run's staging area: every declared file downloaded and
checksummed, the files grouped into layers, each layer cut into Hilbert-ordered chunks that
background threads write while the next chunks are cut.

The caller sees each chunk once its object is written (``on_staged``: where the transform of
that chunk may start) and checks each layer's columns before any of its chunks is offered
(``check_schema``: the recipe's plan, a later stage this package does not import).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from libs.descriptors import Chunk, ChunkIndex, SourceFile
from libs.errors import InputDataError
from libs.manifest import DataFile, Manifest
from libs.memory import release_memory
from libs.object_store import BackgroundPuts, ObjectStore
from libs.sharding.inputs import plan_layers
from libs.sharding.limits import ShardLimits
from libs.sharding.shard import ShardedLayer, shard_layer


@dataclass(frozen=True)
class LandedFile:
    """A declared file as downloaded from the landing bucket: where, and its checksum."""

    data_file: DataFile
    key: str
    path: Path
    sha256: str
    size: int


def download_landed(store: ObjectStore, bucket: str, folder: str, files: list[DataFile],
                    into: Path) -> list[LandedFile]:
    """Download each declared file (``folder`` + its path) into a numbered folder of its own
    under ``into`` (which keeps names, and a Shapefile zip's siblings, apart), hashing it."""
    landed = []
    for number, data_file in enumerate(files):
        key = f"{folder}{data_file.path}"
        local = into / str(number) / Path(data_file.path).name
        local.parent.mkdir(parents=True)
        sha256 = store.download(bucket, key, local)
        landed.append(LandedFile(data_file, key, local, sha256, local.stat().st_size))
    return landed


def shard_landed_batch(
    store: ObjectStore, manifest: Manifest, landed: list[LandedFile], *, landing_bucket: str,
    staging_bucket: str, staging_prefix: str, chunk_key: Callable[[str, int], str],
    scratch: Path, limits: ShardLimits, check_schema: Callable[[str, pa.Schema], None],
    on_staged: Callable[[Chunk], None], on_layer: Callable[[ShardedLayer], None],
) -> ChunkIndex:
    """Shard the batch's ``landed`` files, layer by layer, into ``staging_bucket``: chunk
    ``ordinal`` of ``layer`` at ``chunk_key(layer, ordinal)``. Returns the batch's index."""
    planned = plan_layers([(file.path, file.data_file) for file in landed])
    for side in ("left", "right"):
        name = getattr(manifest.join, side)
        if name not in planned:
            raise InputDataError(
                f"batch {manifest.batch_id!r}: join.{side} names layer {name!r} but the "
                f"files feed {sorted(planned)}")
    by_path = {file.path: file for file in landed}
    layers, sources, types = [], [], {}
    written: dict[tuple[str, int], Future] = {}
    # chunk writes overlap sorting and encoding the next chunks
    with BackgroundPuts(store, threads=2, max_pending=3) as puts:
        for layer_name, layer_sources in planned.items():

            def sink(ordinal: int, data: bytes, layer: str = layer_name) -> str:
                if ordinal == 0:  # the layer's columns are checked before any chunk is offered
                    check_schema(layer, pq.read_schema(pa.BufferReader(data)))
                key = chunk_key(layer, ordinal)
                written[(layer, ordinal)] = puts.put(staging_bucket, key, data,
                                                     "application/vnd.apache.parquet")
                return key

            def staged(chunk: Chunk) -> None:
                def done(write: Future) -> None:
                    if write.exception() is None:
                        on_staged(chunk)

                written.pop((chunk.layer, chunk.ordinal)).add_done_callback(done)

            layer_scratch = scratch / "spill" / layer_name
            layer_scratch.mkdir(parents=True)
            sharded = shard_layer(layer_name, layer_sources, sink, scratch_dir=layer_scratch,
                                  limits=limits, on_chunk=staged)
            puts.wait()
            release_memory()  # the sort's buffers, before the next layer and the load
            check_schema(layer_name, sharded.schema)
            layers.append(sharded.chunks)
            types[layer_name] = list(sharded.geometry_types)
            for source in layer_sources:
                file = by_path[source.path]
                sources.append(SourceFile(
                    bucket=landing_bucket, key=file.key, sha256=file.sha256, size=file.size,
                    layer=layer_name, rows=sharded.rows_per_source[str(source.path)]))
            on_layer(sharded)
    return ChunkIndex(batch_id=manifest.batch_id, staging_bucket=staging_bucket,
                      prefix=staging_prefix, layers=layers, sources=sources, geometry_types=types)

