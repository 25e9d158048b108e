"""Column names chunks add (the bbox covering) or carry only through the sort, and reading one.

The internal ``__shard_*`` columns (bounds, geometry type code, Hilbert key) travel with the
rows from the read pass to the writer and are never written to a chunk.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from libs.geoparquet import COVERING, GEOMETRY

# Internal columns carried through the sort; never written to a chunk.
_MINX, _MINY, _MAXX, _MAXY = "__shard_minx", "__shard_miny", "__shard_maxx", "__shard_maxy"
_TYPE, _KEY = "__shard_type", "__shard_key"  # WKB type * 2 + has Z; Hilbert key
_BOUNDS = (_MINX, _MINY, _MAXX, _MAXY)
_RESERVED = {GEOMETRY, COVERING}


def _float_column(batch: pa.RecordBatch | pa.Table, name: str) -> np.ndarray:
    column = batch.column(name)
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 0:
            return np.zeros(0)
        column = column.combine_chunks() if column.num_chunks > 1 else column.chunk(0)
    return column.to_numpy(zero_copy_only=False)
