"""The Hilbert curve: a 64-bit key per cell of a 2^32 x 2^32 grid, from 8-bit lookup tables,
and the grid that maps bbox centres onto it over a layer's extent."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import pyarrow as pa

from libs.sharding.columns import BOUNDS_COLUMNS, column_values

_EMPTY_KEY = np.uint64(2**64 - 1)  # rows without a geometry sort last
_STEP_BITS = 8


@cache
def _hilbert_tables() -> tuple[np.ndarray, np.ndarray]:
    """Hilbert digits and next orientation for (orientation, 8 bits of x, 8 bits of y).

    The orientation is the transform accumulated so far, an element of the group generated
    by "swap x/y" and "complement both": bit 0 = swapped, bit 1 = complemented. One level
    reads the transformed bits (tx, ty), emits the quadrant digit (3*tx) ^ ty and, in the
    lower quadrants (ty == 0), swaps, complementing too when tx == 1.
    """
    side = 1 << _STEP_BITS
    state = np.repeat(np.arange(4, dtype=np.int64), side * side)
    xs = np.tile(np.repeat(np.arange(side, dtype=np.int64), side), 4)
    ys = np.tile(np.arange(side, dtype=np.int64), 4 * side)
    swap, flip = state & 1, state >> 1
    digits = np.zeros_like(state)
    for bit in range(_STEP_BITS - 1, -1, -1):
        bx, by = ((xs >> bit) & 1) ^ flip, ((ys >> bit) & 1) ^ flip
        tx, ty = np.where(swap == 1, by, bx), np.where(swap == 1, bx, by)
        digits = (digits << 2) | ((3 * tx) ^ ty)
        lower = (ty == 0).astype(np.int64)
        swap, flip = swap ^ lower, flip ^ (lower & tx)
    # Small dtypes keep the tables (0.75 MiB) cache-friendly; the next orientation is stored
    # pre-shifted into place in the next lookup index.
    return digits.astype(np.uint16), ((swap | (flip << 1)) << 16).astype(np.int32)


def hilbert_index(ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """Distance along a Hilbert curve of 2^32 x 2^32 cells, for cell coordinates < 2^32.

    Equal to the classic ``xy2d(2**32, x, y)``; computed 8 bits of each axis at a time.
    """
    digits, next_state = _hilbert_tables()
    x, y = np.asarray(ix, dtype=np.int64), np.asarray(iy, dtype=np.int64)
    key = np.zeros(x.shape, dtype=np.uint64)
    state = np.zeros(x.shape, dtype=np.int32)
    for shift in range(32 - _STEP_BITS, -1, -_STEP_BITS):
        index = state | (((x >> shift) & 0xFF) << 8) | ((y >> shift) & 0xFF)
        key = (key << np.uint64(16)) | digits[index]
        state = next_state[index]
    return key


@dataclass(frozen=True)
class HilbertGrid:
    """Maps bbox centres to Hilbert keys over a layer's extent (one scale for both axes)."""

    minx: float
    miny: float
    scale: float

    @classmethod
    def over(cls, extent: np.ndarray) -> HilbertGrid:
        """The grid over ``extent`` (minx, miny, maxx, maxy of the centres, finite)."""
        minx, miny, maxx, maxy = (float(v) for v in extent)
        size = max(maxx - minx, maxy - miny)
        return cls(minx, miny, (2.0**32 - 1) / size if size > 0 else 0.0)

    def keys(self, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
        """Hilbert keys of bbox centres; rows without a geometry (NaN) sort last."""
        missing = np.isnan(cx)
        limit = 2.0**32 - 1
        cells = []
        for value, low in ((cx, self.minx), (cy, self.miny)):
            scaled = (value - low) * self.scale
            scaled[missing] = 0.0
            cells.append(np.clip(scaled, 0.0, limit, out=scaled).astype(np.int64))
        keys = hilbert_index(*cells)
        keys[missing] = _EMPTY_KEY
        return keys

    def batch_keys(self, batch: pa.RecordBatch | pa.Table) -> np.ndarray:
        """Hilbert keys of the rows of ``batch``, from its bounds columns."""
        minx, miny, maxx, maxy = (column_values(batch, name) for name in BOUNDS_COLUMNS)
        return self.keys((minx + maxx) * 0.5, (miny + maxy) * 0.5)
