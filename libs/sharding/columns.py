"""The columns rows carry through the sort, and reading a column's buffers as numpy.

Each row gets its bbox (``BOUNDS_COLUMNS``) and a geometry type code (``TYPE_CODE_COLUMN``)
in the read pass, and its Hilbert key (``KEY_COLUMN``) in the external sort; they travel
with the row to the writer, which never writes them to a chunk. An input attribute may not
use these names, nor the geometry's or the bbox covering's (:func:`is_reserved_column`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from libs.geoparquet import COVERING, GEOMETRY

_INTERNAL_PREFIX = "__shard_"

#: minx, miny, maxx, maxy of each row's geometry (float64, NaN when it has none).
BOUNDS_COLUMNS = ("__shard_minx", "__shard_miny", "__shard_maxx", "__shard_maxy")
#: WKB geometry type * 2 + has Z (uint8, 0 when no geometry): see ``wkb.type_code_names``.
TYPE_CODE_COLUMN = "__shard_type"
#: The row's Hilbert key (uint64), added by the external sort's partition pass.
KEY_COLUMN = "__shard_key"


def is_reserved_column(name: str) -> bool:
    """True for a name chunks or the sort use, which an input attribute may not take."""
    return name in (GEOMETRY, COVERING) or name.startswith(_INTERNAL_PREFIX)


def column_values(batch: pa.RecordBatch | pa.Table, name: str) -> np.ndarray:
    """The column ``name`` as one numpy array (a copy only when a table holds several chunks)."""
    column = batch.column(name)
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 0:
            return np.zeros(0)
        column = column.combine_chunks() if column.num_chunks > 1 else column.chunk(0)
    return column.to_numpy(zero_copy_only=False)


def binary_parts(array: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, lengths, data bytes) of a binary/string array, without copying values."""
    n = len(array)
    offsets_buffer, data_buffer = array.buffers()[1], array.buffers()[2]
    if n == 0 or offsets_buffer is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    offsets = np.frombuffer(offsets_buffer, dtype=np.int32)[array.offset: array.offset + n + 1]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else \
        np.zeros(0, np.uint8)
    starts = offsets[:-1].astype(np.int64)
    return starts, np.diff(offsets).astype(np.int64), data
