"""Cutting the sorted row stream into bounded chunks and encoding them as GeoParquet 1.1.

Chunks are cut where ``chunk_rows`` or ``chunk_bytes`` (estimated from the rows' Arrow size)
would be exceeded, and split in half if the encoding still exceeds ``chunk_bytes``. Each is
written with pyarrow (zstd, ``geo`` metadata with the CRS as PROJJSON, geometry_types and
bbox: ``libs.geoparquet``) on ``encode_threads`` encoder threads; the sink is called from the
calling thread, in order.

Staging chunks carry no covering column: their only reader is the transform task, which
reads every row, and the chunk index already holds each chunk's bbox; the covering would be
almost half of a point chunk's bytes, each stored and read back (``docs/sharding.md``). The
transform writes the covering into its output, which is what the lake publishes.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyproj import CRS

from libs.descriptors import BBox, Chunk
from libs.geoparquet import GEOMETRY, geo_metadata, write_geoparquet
from libs.sharding.columns import BOUNDS_COLUMNS, TYPE_CODE_COLUMN, column_values
from libs.sharding.crs import crs_text
from libs.sharding.limits import ShardLimits
from libs.sharding.wkb import binary_parts, type_code_names

#: A sink stores one encoded chunk under its ordinal and returns the object key.
ChunkSink = Callable[[int, bytes], str]


def _row_sizes(table: pa.Table, columns: list[str]) -> np.ndarray:
    """Arrow bytes each row takes in an output chunk (plus its 32-byte bbox)."""
    sizes = np.full(table.num_rows, 32, dtype=np.int64)
    for name in columns:
        column = table.column(name)
        data_type = column.type
        if pa.types.is_binary(data_type) or pa.types.is_string(data_type):
            parts = [binary_parts(chunk)[1] + 4 for chunk in column.chunks]
            sizes += np.concatenate(parts) if parts else 0
        elif pa.types.is_fixed_size_binary(data_type):
            sizes += data_type.byte_width + 4  # as the binary column it is written as
        elif data_type.bit_width and data_type.bit_width >= 8:
            sizes += data_type.bit_width // 8
        elif pa.types.is_boolean(data_type) or pa.types.is_null(data_type):
            sizes += 1
        elif table.num_rows:
            sizes += -(-column.nbytes // table.num_rows)
    return sizes


@dataclass
class _Encoded:
    rows: int
    data: bytes
    bbox: BBox | None
    sha256: str


class ChunkWriter:
    """Cuts the sorted row stream into bounded chunks and encodes them (GeoParquet 1.1).

    Feed it runs of rows in output order (:meth:`add_run`), then :meth:`finish` (or
    :meth:`abort` on an error). Rows carry the bounds and type code columns (``columns``);
    chunk boundaries depend only on the rows, not on how they were split into runs.
    """

    def __init__(self, layer: str, crs: CRS, schema: pa.Schema, sink: ChunkSink,
                 limits: ShardLimits, on_chunk: Callable[[Chunk], None] | None = None):
        self.layer, self.sink, self.limits, self.on_chunk = layer, sink, limits, on_chunk
        self.crs_text = crs_text(crs)
        self.projjson = crs.to_json_dict()
        self.schema = schema
        self.attributes = [n for n in schema.names if n != GEOMETRY]
        self.output_columns = [*self.attributes, GEOMETRY]
        self.gathered = [*self.output_columns, *BOUNDS_COLUMNS, TYPE_CODE_COLUMN]
        # Rows of the next chunk, as (table, row indices) pieces gathered by the encoder.
        self.pending: list[tuple[pa.Table, np.ndarray]] = []
        self.pending_rows = 0
        self.pending_bytes = 0
        self.pool = ThreadPoolExecutor(max_workers=limits.encode_threads,
                                       thread_name_prefix="shard-encode")
        self.in_flight: deque[Future] = deque()
        self.chunks: list[Chunk] = []
        self.row_offset = 0

    def add_run(self, table: pa.Table, order: np.ndarray) -> None:
        """Append ``table`` rows in the order ``order`` to the output stream."""
        if not len(order):
            return
        sizes = _row_sizes(table, self.output_columns)[order]
        cumulative = np.cumsum(sizes)
        position, total = 0, len(order)
        while position < total:
            before = cumulative[position - 1] if position else 0
            room_rows = self.limits.chunk_rows - self.pending_rows
            room_bytes = self.limits.chunk_bytes - self.pending_bytes
            by_bytes = int(np.searchsorted(cumulative, before + room_bytes, side="right")) - position
            count = min(room_rows, by_bytes, total - position)
            if count <= 0:
                if self.pending_rows:
                    self._flush()
                    continue
                count = 1  # a single row larger than chunk_bytes still makes a chunk
            self.pending.append((table, order[position: position + count]))
            self.pending_rows += count
            self.pending_bytes += int(cumulative[position + count - 1] - before)
            position += count
            if position < total or self.pending_rows >= self.limits.chunk_rows:
                self._flush()
        # Rows carried over to the next run are copied, so this run's table can be freed.
        self.pending = [(piece.select(self.gathered).take(pa.array(rows)), np.arange(len(rows)))
                        if piece is table else (piece, rows) for piece, rows in self.pending]

    def finish(self) -> list[Chunk]:
        """Write the last chunk, wait for every chunk to reach the sink; their index entries."""
        try:
            if self.pending_rows:
                self._flush()
            elif not self.chunks and not self.in_flight:
                # an empty layer is a valid delivery: one chunk of no rows carries its schema
                self.pending.append((self._empty_rows(), np.arange(0)))
                self._flush()
            while self.in_flight:
                self._deliver(self.in_flight.popleft())
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        return self.chunks

    def _empty_rows(self) -> pa.Table:
        fields = [self.schema.field(n) for n in self.output_columns]
        fields += [pa.field(n, pa.float64()) for n in BOUNDS_COLUMNS]
        return pa.schema([*fields, pa.field(TYPE_CODE_COLUMN, pa.uint8())]).empty_table()

    def abort(self) -> None:
        """Stop the encoder threads without delivering what is still pending."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _flush(self) -> None:
        pieces = self.pending
        self.pending, self.pending_rows, self.pending_bytes = [], 0, 0
        self.in_flight.append(self.pool.submit(self._gather_and_encode, pieces))
        while len(self.in_flight) > self.limits.encode_threads:
            self._deliver(self.in_flight.popleft())

    def _deliver(self, future: Future) -> None:
        for encoded in future.result():
            ordinal = len(self.chunks)
            key = self.sink(ordinal, encoded.data)
            self.chunks.append(Chunk(
                key=key, layer=self.layer, ordinal=ordinal, row_offset=self.row_offset,
                rows=encoded.rows, bbox=encoded.bbox, crs=self.crs_text, bytes=len(encoded.data),
                sha256=encoded.sha256))
            self.row_offset += encoded.rows
            if self.on_chunk is not None:
                self.on_chunk(self.chunks[-1])

    def _gather_and_encode(self, pieces: list[tuple[pa.Table, np.ndarray]]) -> list[_Encoded]:
        # Runs on an encoder thread: Arrow's take and Parquet writing release the GIL.
        tables = [_binary_geometry(table.select(self.gathered).take(pa.array(rows)))
                  for table, rows in pieces]
        pieces.clear()  # let the sorted run go as soon as its rows are gathered
        return self._encode_bounded(pa.concat_tables(tables) if len(tables) > 1 else tables[0])

    def _encode_bounded(self, table: pa.Table) -> list[_Encoded]:
        encoded = self._encode(table)
        if len(encoded.data) <= self.limits.chunk_bytes or table.num_rows == 1:
            return [encoded]
        half = table.num_rows // 2
        return self._encode_bounded(table.slice(0, half)) + \
            self._encode_bounded(table.slice(half))

    def _encode(self, table: pa.Table) -> _Encoded:
        values = [column_values(table, name) for name in BOUNDS_COLUMNS]
        types = type_code_names(column_values(table, TYPE_CODE_COLUMN))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: every geometry empty
            box = (np.nanmin(values[0]), np.nanmin(values[1]), np.nanmax(values[2]),
                   np.nanmax(values[3])) if table.num_rows else (np.nan,) * 4
        bbox = None if np.isnan(box).any() else tuple(float(v) for v in box)
        out = pa.Table.from_arrays(
            [table.column(n) for n in self.output_columns],
            schema=pa.schema([self.schema.field(n) for n in self.output_columns]))
        # staging chunks: no covering and no statistics (the transform writes the lake's)
        data = write_geoparquet(out, geo_metadata(self.projjson, types, bbox, covering=False),
                                attribute_statistics=False)
        return _Encoded(table.num_rows, data, bbox, hashlib.sha256(data).hexdigest())


def fixed_size_geometry(table: pa.Table) -> pa.Table:
    """The geometry column as fixed-size binary when every WKB has the same size (points).

    Gathering rows of fixed-size values is a plain strided copy, several times faster than
    gathering variable-size binary; chunks are written back as binary. A zero-copy view."""
    column = table.column(GEOMETRY)
    width, parts = None, []
    for chunk in column.chunks:
        if not len(chunk):
            continue
        starts, lengths, _ = binary_parts(chunk)
        if chunk.null_count or not (lengths == lengths[0]).all() or width not in (None, lengths[0]):
            return table
        width = int(lengths[0])
        values = chunk.buffers()[2].slice(int(starts[0]), len(chunk) * width)
        parts.append(pa.Array.from_buffers(pa.binary(width), len(chunk), [None, values]))
    if width is None:
        return table
    index = table.schema.get_field_index(GEOMETRY)
    return table.set_column(index, GEOMETRY, pa.chunked_array(parts, type=pa.binary(width)))


def _binary_geometry(table: pa.Table) -> pa.Table:
    """Undo :func:`fixed_size_geometry` (GeoParquet stores WKB as variable-size binary)."""
    column = table.column(GEOMETRY)
    if not pa.types.is_fixed_size_binary(column.type):
        return table
    return table.set_column(table.schema.get_field_index(GEOMETRY), GEOMETRY,
                            column.cast(pa.binary()))
