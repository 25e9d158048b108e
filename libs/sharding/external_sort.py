"""Passes 2 and 3: order a layer's rows by Hilbert key and feed them to the chunk writer.

A layer that fits in memory is keyed, sorted and cut at once. A larger one is streamed once
more from its spill files and range-partitioned into up to 256 bucket files at quantiles of
the sampled keys; the buckets are then sorted one at a time, the unfinished chunk carried
over, so the bytes equal those of the in-memory sort. A bucket over half the budget is
re-partitioned on its own key quantiles, recursively; one whose rows share a single key is
streamed straight out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from libs.sharding.collect import CollectedLayer
from libs.sharding.columns import BOUNDS_COLUMNS, KEY_COLUMN, TYPE_CODE_COLUMN
from libs.sharding.hilbert import HilbertGrid
from libs.sharding.limits import ShardLimits
from libs.sharding.schema import conform_batch
from libs.sharding.writer import ChunkWriter, fixed_size_geometry

T = TypeVar("T")
R = TypeVar("R")
_MAX_BUCKETS = 256
#: Rows a bucket buffers before appending them to its file (fewer, larger IPC batches).
BUCKET_FLUSH_ROWS = 16_384


class _Buckets:
    """Range-partitions rows by key into IPC files, buffering small pieces per bucket."""

    def __init__(self, folder: Path, boundaries: np.ndarray, schema: pa.Schema, budget: int):
        self.folder, self.boundaries, self.schema, self.budget = folder, boundaries, schema, budget
        count = len(boundaries) + 1
        self.paths = [folder / f"bucket-{i:04d}.arrows" for i in range(count)]
        self.writers: list[ipc.RecordBatchStreamWriter | None] = [None] * count
        self.files: list[pa.OSFile | None] = [None] * count
        self.buffers: list[list[pa.RecordBatch]] = [[] for _ in range(count)]
        self.buffered_rows = [0] * count
        self.rows = [0] * count
        self.nbytes = [0] * count
        self.min_key = [np.uint64(2**64 - 1)] * count
        self.max_key = [np.uint64(0)] * count
        self.buffered_bytes = 0

    def add(self, batch: pa.RecordBatch, keys: np.ndarray) -> None:
        self.add_partitioned(*_partition(batch, keys, self.boundaries))

    def add_partitioned(self, batch: pa.RecordBatch, keys: np.ndarray,
                        counts: np.ndarray) -> None:
        """Append a ``_partition`` result: rows grouped by bucket, ``counts`` per bucket."""
        start = 0
        for index in np.flatnonzero(counts).tolist():
            stop = start + int(counts[index])
            piece = batch.slice(start, stop - start)
            self.buffers[index].append(piece)
            self.buffered_rows[index] += piece.num_rows
            self.rows[index] += piece.num_rows
            size = piece.nbytes
            self.nbytes[index] += size
            self.buffered_bytes += size
            self.min_key[index] = min(self.min_key[index], keys[start:stop].min())
            self.max_key[index] = max(self.max_key[index], keys[start:stop].max())
            if self.buffered_rows[index] >= BUCKET_FLUSH_ROWS:
                self._flush(index)
            start = stop
        if self.buffered_bytes > self.budget:
            for index in range(len(self.paths)):
                self._flush(index)

    def _flush(self, index: int) -> None:
        if not self.buffers[index]:
            return
        if self.writers[index] is None:
            self.files[index] = pa.OSFile(str(self.paths[index]), "wb")
            self.writers[index] = ipc.new_stream(self.files[index], self.schema)
        table = pa.Table.from_batches(self.buffers[index])
        for batch in table.combine_chunks().to_batches():
            self.writers[index].write_batch(batch)
        self.buffered_bytes -= sum(b.nbytes for b in self.buffers[index])
        self.buffers[index], self.buffered_rows[index] = [], 0

    def close(self) -> None:
        for index in range(len(self.paths)):
            self._flush(index)
            if self.writers[index] is not None:
                self.writers[index].close()
                self.files[index].close()


def _partition(batch: pa.RecordBatch, keys: np.ndarray, boundaries: np.ndarray
               ) -> tuple[pa.RecordBatch, np.ndarray, np.ndarray]:
    """``batch`` with its ``KEY_COLUMN`` column, rows grouped by bucket (stable within each), the
    keys in that order, and the row count per bucket. Touches no shared state."""
    bucket = np.searchsorted(boundaries, keys, side="right")
    order = np.argsort(bucket, kind="stable")
    counts = np.bincount(bucket, minlength=len(boundaries) + 1)
    batch = batch.append_column(KEY_COLUMN, pa.array(keys)).take(pa.array(order))
    return batch, keys[order], counts


def map_in_order_ahead(items: Iterator[T], work: Callable[[T], R], *, threads: int,
                       ahead: int) -> Iterator[R]:
    """``work(item)`` for each item, on ``threads`` threads, yielded in the items' order,
    at most ``ahead`` items in flight."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shard-partition") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(work, item))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _read_bucket(path: Path) -> Iterator[pa.RecordBatch]:
    with pa.OSFile(str(path), "rb") as handle:
        yield from ipc.open_stream(handle)


def _bucket_bytes(limits: ShardLimits) -> int:
    """Target size of an external-sort bucket: a quarter of the in-memory size, so that an
    external sort (plus what the read pass left in the allocator) stays below the memory of
    sorting the largest in-memory layer."""
    return limits.sort_memory_bytes // 8


def _quantile_boundaries(keys: np.ndarray, count: int) -> np.ndarray:
    if count <= 1 or not len(keys):
        return np.zeros(0, dtype=np.uint64)
    ordered = np.sort(keys)
    picks = ordered[(np.arange(1, count) * len(ordered)) // count]
    return np.unique(picks)


def _emit_bucket(path: Path, rows: int, nbytes: int, low: np.uint64, high: np.uint64,
                 schema: pa.Schema, writer: ChunkWriter, scratch: Path, limits: ShardLimits,
                 depth: int = 0) -> None:
    if not rows:
        return
    if low == high:
        # Every row has the same key: the file is already in (key, source order).
        for batch in _read_bucket(path):
            table = pa.Table.from_batches([batch])
            writer.add_run(table, np.arange(batch.num_rows))
        path.unlink(missing_ok=True)
        return
    if nbytes <= limits.in_memory_sort_bytes:
        table = pa.Table.from_batches(list(_read_bucket(path)), schema=schema)
        path.unlink(missing_ok=True)
        writer.add_run(fixed_size_geometry(table), stable_argsort(_key_column(table)))
        return
    # Too big to sort in memory (skewed data): split on this bucket's own key quantiles.
    strided = [batch.column(KEY_COLUMN).to_numpy()[:: max(1, batch.num_rows // 64)]
               for batch in _read_bucket(path)]
    candidates = np.concatenate(strided)
    count = min(_MAX_BUCKETS, max(2, -(-nbytes // _bucket_bytes(limits))))
    boundaries = _quantile_boundaries(candidates, count)
    boundaries = boundaries[(boundaries > low) & (boundaries <= high)]
    if not len(boundaries):
        boundaries = np.array([high], dtype=np.uint64)  # split off the largest key at least
    folder = scratch / f"split-{depth}-{path.stem}"
    folder.mkdir()
    buckets = _Buckets(folder, boundaries, schema, _bucket_bytes(limits) // 2)
    for batch in _read_bucket(path):
        buckets.add(batch.drop_columns([KEY_COLUMN]), batch.column(KEY_COLUMN).to_numpy())
    buckets.close()
    path.unlink(missing_ok=True)
    for index, sub in enumerate(buckets.paths):
        _emit_bucket(sub, buckets.rows[index], buckets.nbytes[index], buckets.min_key[index],
                     buckets.max_key[index], schema, writer, folder, limits, depth + 1)


def stable_argsort(keys: np.ndarray) -> np.ndarray:
    """Positions that sort ``keys``, equal keys in position order (a stable sort).

    numpy's stable sort of 64-bit integers is a merge sort, twice as slow as its quicksort;
    keys are rarely equal, so quicksort and then order the (few) runs of equal keys.
    """
    order = np.argsort(keys)
    ordered = keys[order]
    equal = np.flatnonzero(ordered[1:] == ordered[:-1])
    if len(equal):
        tied = np.union1d(equal, equal + 1)  # positions inside runs of equal keys
        order[tied] = order[tied][np.lexsort((order[tied], ordered[tied]))]
    return order


def _key_column(table: pa.Table) -> np.ndarray:
    column = table.column(KEY_COLUMN)
    return (column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)).to_numpy()


def sort_and_emit(collected: CollectedLayer, writer: ChunkWriter, scratch_dir: Path,
                  limits: ShardLimits) -> None:
    """Passes 2 and 3: feed ``writer`` every row of ``collected`` in Hilbert key order (equal
    keys in source order), in memory or through bucket files in ``scratch_dir``. An empty
    layer feeds nothing (the writer then makes its one empty chunk)."""
    if not collected.rows:
        collected.release()
        return
    grid = (HilbertGrid.over(collected.extent) if np.isfinite(collected.extent).all()
            else HilbertGrid(0.0, 0.0, 0.0))
    full_schema = pa.schema([*collected.schema,
                             *(pa.field(n, pa.float64()) for n in BOUNDS_COLUMNS),
                             pa.field(TYPE_CODE_COLUMN, pa.uint8())])
    if collected.in_memory:
        batches = [conform_batch(b, full_schema) for b in collected.read()]
        collected.release()
        keys = np.concatenate([grid.batch_keys(b) for b in batches])
        table = fixed_size_geometry(pa.Table.from_batches(batches, schema=full_schema))
        writer.add_run(table, stable_argsort(keys))
        return
    target = _bucket_bytes(limits)
    count = int(min(_MAX_BUCKETS, max(2, -(-collected.nbytes // target))))
    centres = collected.sample_centres
    sample_keys = grid.keys(centres[:, 0].copy(), centres[:, 1].copy())
    boundaries = _quantile_boundaries(sample_keys, count)
    folder = scratch_dir / "buckets"
    folder.mkdir()
    bucket_schema = full_schema.append(pa.field(KEY_COLUMN, pa.uint64()))
    buckets = _Buckets(folder, boundaries, bucket_schema, target // 2)

    def keyed_and_partitioned(batch: pa.RecordBatch
                              ) -> tuple[pa.RecordBatch, np.ndarray, np.ndarray]:
        batch = conform_batch(batch, full_schema)
        return _partition(batch, grid.batch_keys(batch), boundaries)

    # Keying and grouping a batch (numpy and Arrow, which release the GIL) is most of this
    # pass: on two threads it overlaps with reading the spill and writing the buckets, and
    # with itself, while no chunk is out yet and Ray's workers wait.
    for partitioned in map_in_order_ahead(collected.read(), keyed_and_partitioned,
                                          threads=limits.encode_threads, ahead=4):
        buckets.add_partitioned(*partitioned)
    buckets.close()
    for index, path in enumerate(buckets.paths):
        _emit_bucket(path, buckets.rows[index], buckets.nbytes[index], buckets.min_key[index],
                     buckets.max_key[index], bucket_schema, writer, folder, limits)
        # Hand freed bucket memory back to the OS: otherwise the allocator's cache, not the
        # data, would grow with the number of buckets.
        pa.default_memory_pool().release_unused()
