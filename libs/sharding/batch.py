"""Sharding one landed batch into the run's staging area: every declared file downloaded and
checksummed, the files grouped into layers, each layer cut into Hilbert-ordered chunks that
background threads write while the next chunks are cut.

The caller sees each chunk once its object is written (``on_staged``: where the transform of
that chunk may start) and checks each layer's columns when its first file is opened, before
any row is read, and again before any of its chunks is offered (``check_schema``: the
recipe's plan and what the joins load into PostGIS, later stages this package does not
import).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyproj import CRS

from libs.descriptors import Chunk, ChunkIndex, LayerChunks, SourceFile
from libs.errors import InputDataError
from libs.geoparquet import encode_columns
from libs.manifest import DataFile, Manifest, bad_geometry_policy
from libs.manifest.rejects import breach_message
from libs.memory import release_memory
from libs.object_store import BackgroundPuts, ObjectInfo, ObjectStore
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
                    into: Path, max_file_bytes: int | None = None,
                    check_space: Callable[[list[tuple[str, int]]], object] | None = None,
                    pins: Mapping[str, ObjectInfo] | None = None) -> list[LandedFile]:
    """Download each declared file (``folder`` + its path) into a numbered folder of its own
    under ``into`` (which keeps names, and a Shapefile zip's siblings, apart), hashing it.

    With ``max_file_bytes`` or ``check_space``, every file's size is read (HEAD, or its pin)
    before any is downloaded: each is checked against ``max_file_bytes`` (a download stops
    should the object have grown since) and ``check_space`` is called with every file's
    (format, size). With ``pins`` (landing key -> version validated), each file is read at
    exactly that version, else ``PinnedVersionChanged`` names it."""
    pins = pins or {}
    if max_file_bytes is not None or check_space is not None:
        sizes = []
        for data_file in files:
            key = f"{folder}{data_file.path}"
            size = pins[key].size if key in pins else store.size(bucket, key)
            sizes.append((str(data_file.format), size))
            if max_file_bytes is not None and size > max_file_bytes:
                raise InputDataError(
                    f"file {data_file.path!r} is {size:,} bytes; the limit is {max_file_bytes:,} "
                    "bytes per landed file: split it into several files of the same layer "
                    "(or raise the shard op's max_file_bytes)")
        if check_space is not None:
            check_space(sizes)
    landed = []
    for number, data_file in enumerate(files):
        key = f"{folder}{data_file.path}"
        local = into / str(number) / Path(data_file.path).name
        local.parent.mkdir(parents=True)
        try:
            sha256 = store.download(bucket, key, local, max_bytes=max_file_bytes,
                                    pin=pins.get(key))
        except ValueError as exc:
            raise InputDataError(f"file {data_file.path!r}: {exc} (the limit per landed file); "
                                 "it changed after the batch was checked") from None
        landed.append(LandedFile(data_file, key, local, sha256, local.stat().st_size))
    return landed


def _rejects_chunk(store: ObjectStore, bucket: str, key: str, sharded: ShardedLayer,
                   ordinal: int) -> Chunk:
    """Stage the rows ``sharded`` set apart as one rejects object in the transform's rejects
    layout (``libs.transformations.chunk``), without geometry: the reason names the file and
    row. Their ``_row_id`` values follow the layer's chunks', so they never collide."""
    rows = len(sharded.rejected)
    steps, reasons, values = zip(*sharded.rejected, strict=True)
    attributes = pa.table({
        "_row_id": pa.array(range(sharded.rows, sharded.rows + rows), pa.int64()),
        "_reject_step": pa.array(steps, pa.string()),
        "_reject_reason": pa.array(reasons, pa.string()),
        "_attributes": pa.array(values, pa.string())})
    data, _, _ = encode_columns(attributes, pa.nulls(rows, pa.binary()), np.full((rows, 4), np.nan),
                                np.ones(rows, bool), [], CRS.from_user_input(sharded.chunks.crs))
    sha256 = store.put_bytes(bucket, key, data, "application/vnd.apache.parquet")
    return Chunk(key=key, layer=sharded.layer, ordinal=ordinal, row_offset=sharded.rows, rows=rows,
                 bbox=None, crs=sharded.chunks.crs, bytes=len(data), sha256=sha256)


def _check_reject_fraction(manifest: Manifest, sharded: ShardedLayer) -> None:
    """Fail the layer, before any transform, when the rows it refused while reading already
    exceed its ``max_reject_fraction`` (the transform checks again with the recipe's)."""
    problems = [(step, reason) for step, reason, _ in sharded.rejected]
    message = breach_message(sharded.layer, len(problems), sharded.rows + len(problems),
                             manifest.max_reject_fraction_for(sharded.layer), problems)
    if message:
        raise InputDataError(message)


def shard_landed_batch(
    store: ObjectStore, manifest: Manifest, landed: list[LandedFile], *, landing_bucket: str,
    staging_bucket: str, staging_prefix: str, chunk_key: Callable[[str, int], str],
    scratch: Path, limits: ShardLimits, check_schema: Callable[[str, pa.Schema], None],
    on_staged: Callable[[Chunk], None], on_layer: Callable[[ShardedLayer], None],
    rejects_key: Callable[[str, int], str] | None = None,
) -> ChunkIndex:
    """Shard the batch's ``landed`` files, layer by layer, into ``staging_bucket``: chunk
    ``ordinal`` of ``layer`` at ``chunk_key(layer, ordinal)``. Returns the batch's index.

    A geometry over ``limits.max_vertices`` fails the run when the layer's recipe fails on
    bad geometries, else its row goes to the index's rejects, staged at
    ``rejects_key(layer, <chunks of the layer>)``, as does a row that cannot be read (bad
    WKT, x/y or text, a geometry PostGIS would refuse); more of those than the layer's
    ``max_reject_fraction`` fails the run, listing them."""
    planned = plan_layers([(file.path, file.data_file) for file in landed])
    for join in manifest.spatial_joins:
        for side in ("left", "right"):
            name = getattr(join, side)
            if name not in planned:
                raise InputDataError(
                    f"batch {manifest.batch_id!r}: join {join.name!r}: {side} names layer "
                    f"{name!r} but the files feed {sorted(planned)}")
    by_path = {file.path: file for file in landed}
    layers, sources, types, rejects = [], [], {}, []
    shard_steps: dict[str, dict[str, int]] = {}
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
            sharded = shard_layer(
                layer_name, layer_sources, sink, scratch_dir=layer_scratch, limits=limits,
                on_chunk=staged,
                vertex_policy=bad_geometry_policy(manifest.recipe_for(layer_name)),
                on_schema=partial(check_schema, layer_name))
            puts.wait()
            release_memory()  # the sort's buffers, before the next layer and the load
            check_schema(layer_name, sharded.schema)
            _check_reject_fraction(manifest, sharded)
            layers.append(sharded.chunks)
            if sharded.rejected:
                if rejects_key is None:
                    raise ValueError("rows were rejected but shard_landed_batch got no rejects_key")
                ordinal = len(sharded.chunks.chunks)
                counts = shard_steps.setdefault(layer_name, {})
                for step, _, _ in sharded.rejected:
                    counts[step] = counts.get(step, 0) + 1
                rejects.append(LayerChunks(layer=layer_name, crs=sharded.chunks.crs, chunks=[
                    _rejects_chunk(store, staging_bucket, rejects_key(layer_name, ordinal),
                                   sharded, ordinal)]))
            types[layer_name] = list(sharded.geometry_types)
            for source in layer_sources:
                file = by_path[source.path]
                sources.append(SourceFile(
                    bucket=landing_bucket, key=file.key, sha256=file.sha256, size=file.size,
                    layer=layer_name, rows=sharded.rows_per_source[str(source.path)]))
            on_layer(sharded)
    return ChunkIndex(batch_id=manifest.batch_id, staging_bucket=staging_bucket,
                      prefix=staging_prefix, layers=layers, sources=sources, geometry_types=types,
                      rejects=rejects, shard_reject_steps=shard_steps)

