"""Where the coordinates of a WKB array are, found by walking the bytes with numpy.

Both the shard stage (the bounds it sorts and cuts chunks by) and the transform stage's
coordinate-array path read large batches of plain geometries; one GEOS object per geometry
is most of what a shapely parse of them costs. Here the values are walked with a cursor per
geometry, one vectorised pass per ring or part index, and the result says where each block
of consecutive 2D points lies in the buffer, so that callers read (or rewrite) the
coordinates as two float arrays.

The walk takes non-NULL, non-empty 2D Point, LineString, Polygon, MultiPoint,
MultiLineString and MultiPolygon values in little-endian ISO WKB (every part non-empty,
every line with at least 2 points, every ring with at least 4), and nothing else:
``wkb_layout`` returns None for anything outside that (big-endian, Z or M, curves,
collections, a truncated value, bytes after a value's end). It does not look at the
coordinates; ``WkbLayout.rings_closed`` and a finiteness check are the caller's, as what
GEOS would refuse to read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

TYPE_NAMES = {1: "Point", 2: "LineString", 3: "Polygon", 4: "MultiPoint",
               5: "MultiLineString", 6: "MultiPolygon"}
_PART_OF = {4: 1, 5: 2, 6: 3}  # Multi* type code -> the type code of its parts
# Coordinate blocks: a point, a line, a polygon's exterior ring, an interior ring.
POINT, LINE, SHELL, HOLE = 0, 1, 2, 3
# Above this many rings or parts in one geometry the per-index passes cost more than GEOS.
_MAX_PASSES = 1_024



class _NotPlain(Exception):
    """The chunk is outside this path (internal: the caller gets None)."""


@dataclass(frozen=True)
class WkbLayout:
    """Where the coordinates of a WKB array are: blocks of ``count`` consecutive 2D points
    starting at byte ``start`` of ``data``, in buffer order, each of one geometry."""

    data: np.ndarray  # uint8, the values' bytes (the array's offsets rebased to 0)
    offsets: np.ndarray  # int64, n + 1
    types: np.ndarray  # uint32 WKB type code per geometry
    start: np.ndarray  # int64 per block
    count: np.ndarray  # int64 per block
    geometry: np.ndarray  # int64 per block: the geometry it belongs to
    kind: np.ndarray  # int8 per block: POINT, LINE, SHELL, HOLE

    def coordinate_mask(self) -> np.ndarray:
        """A bool per byte of ``data``: True on the coordinates' bytes."""
        delta = np.zeros(len(self.data) + 1, dtype=np.int8)
        delta[self.start] = 1
        delta[self.start + 16 * self.count] = -1  # blocks never touch: a header lies between
        return np.cumsum(delta[:-1], dtype=np.int8).view(bool)

    def coordinates(self, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """x and y of every point, in buffer order (``mask``: ``coordinate_mask()``, if the
        caller already has it)."""
        mask = self.coordinate_mask() if mask is None else mask
        xy = self.data[mask].view("<f8").reshape(-1, 2)
        return np.ascontiguousarray(xy[:, 0]), np.ascontiguousarray(xy[:, 1])

    def rings_closed(self, x: np.ndarray, y: np.ndarray) -> bool:
        """Whether every ring ends on its first point (GEOS refuses to read one that does not)."""
        rings = self.kind >= SHELL
        first, last = (ends[rings] for ends in self.coordinate_ranges())
        return bool(((x[first] == x[last]) & (y[first] == y[last])).all())

    def bounds(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(n, 4) minx, miny, maxx, maxy per geometry at coordinates ``x, y``, of every
        point but the interior rings' (GEOS's envelope, which ``shapely.bounds`` returns)."""
        # per block first (blocks are non-empty and in buffer order), then per geometry over
        # its points, lines and exterior rings: no array as long as the coordinates but x, y
        first, _ = self.coordinate_ranges()
        counted = self.kind != HOLE
        geometry = self.geometry[counted]
        starts = np.searchsorted(geometry, np.arange(len(self.types)))
        return np.column_stack([
            reduce.reduceat(reduce.reduceat(values, first)[counted], starts)
            for reduce, values in ((np.minimum, x), (np.minimum, y), (np.maximum, x),
                                   (np.maximum, y))])

    def coordinate_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        """(first, last) index of each block's coordinates among all, in buffer order."""
        ends = np.cumsum(self.count)
        return ends - self.count, ends - 1

    def with_coordinates(self, mask: np.ndarray, xy: np.ndarray) -> pa.Array:
        """The WKB array with its coordinates replaced by ``xy`` ((m, 2), buffer order)."""
        out = self.data.copy()
        out[mask] = np.ascontiguousarray(xy, dtype="<f8").view(np.uint8).ravel()
        return pa.Array.from_buffers(pa.binary(), len(self.types),
                                     [None, pa.py_buffer(self.offsets.astype(np.int32)),
                                      pa.py_buffer(out)])


class _Walk:
    """One vectorised pass over WKB values; raises _NotPlain at the first thing it does not
    take (see the module docstring)."""

    def __init__(self, data: np.ndarray, ends: np.ndarray) -> None:
        self.data, self.ends = data, ends
        self.blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []

    def _need(self, pos: np.ndarray, geom: np.ndarray, size: np.ndarray | int) -> None:
        if (pos + size > self.ends[geom]).any():
            raise _NotPlain("a value ends before its header or coordinates")

    def _u32(self, pos: np.ndarray) -> np.ndarray:
        b = self.data[pos[:, None] + np.arange(4)].astype(np.int64)
        return b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16 | b[:, 3] << 24

    def header(self, pos: np.ndarray, geom: np.ndarray) -> np.ndarray:
        """The type code of the geometries whose WKB starts at ``pos`` (little-endian only)."""
        self._need(pos, geom, 5)
        if (self.data[pos] != 1).any():
            raise _NotPlain("big-endian WKB")
        return self._u32(pos + 1)

    def count(self, pos: np.ndarray, geom: np.ndarray, least: int) -> np.ndarray:
        self._need(pos, geom, 4)
        n = self._u32(pos)
        if (n < least).any():
            raise _NotPlain("an empty part, or a line or ring with too few points")
        return n

    def coordinates(self, pos: np.ndarray, geom: np.ndarray, n: np.ndarray, kind: int
                    ) -> np.ndarray:
        self._need(pos, geom, 16 * n)
        self.blocks.append((pos, n, geom, kind))
        return pos + 16 * n

    def geometry(self, code: int, pos: np.ndarray, geom: np.ndarray) -> np.ndarray:
        """Walk geometries of type ``code`` whose bodies (after the 5-byte header) start at
        ``pos``; returns where each ends."""
        if code == 1:
            return self.coordinates(pos, geom, np.ones(len(pos), dtype=np.int64), POINT)
        if code == 2:
            n = self.count(pos, geom, 2)
            return self.coordinates(pos + 4, geom, n, LINE)
        parts = self.count(pos, geom, 1)  # rings of a polygon, parts of a Multi*
        if int(parts.max()) > _MAX_PASSES:
            raise _NotPlain("too many rings or parts for the array path")
        pos = pos + 4
        for index in range(int(parts.max())):
            active = np.flatnonzero(parts > index)
            at, of = pos[active], geom[active]
            if code == 3:
                n = self.count(at, of, 4)
                pos[active] = self.coordinates(at + 4, of, n, SHELL if index == 0 else HOLE)
            else:
                if (self.header(at, of) != _PART_OF[code]).any():
                    raise _NotPlain("a Multi* part of another type")
                pos[active] = self.geometry(_PART_OF[code], at + 5, of)
        return pos


def wkb_layout(array: pa.Array) -> WkbLayout | None:
    """The coordinate layout of a WKB array, or None when any value is outside this path."""
    if array.null_count or not len(array):
        return None
    if pa.types.is_large_binary(array.type):
        offset_type = np.int64
    elif pa.types.is_binary(array.type):
        offset_type = np.int32
    else:
        return None
    _, offsets, values = array.buffers()
    width = np.dtype(offset_type).itemsize
    offsets = np.frombuffer(offsets, dtype=offset_type, count=len(array) + 1,
                            offset=array.offset * width).astype(np.int64)
    data = np.frombuffer(values, dtype=np.uint8, count=int(offsets[-1] - offsets[0]),
                         offset=int(offsets[0]))
    offsets = offsets - offsets[0]
    if offsets[-1] >= 2**31:
        return None  # the output is a 32-bit-offset binary array
    starts, ends = offsets[:-1], offsets[1:]
    walk = _Walk(data, ends)
    everyone = np.arange(len(array), dtype=np.int64)
    try:
        types = walk.header(starts, everyone)
        for code in np.unique(types):
            if int(code) not in TYPE_NAMES:
                raise _NotPlain("not a 2D simple-feature type")
            mine = np.flatnonzero(types == code)
            if (walk.geometry(int(code), starts[mine] + 5, mine) != ends[mine]).any():
                raise _NotPlain("bytes after a geometry's end")
    except _NotPlain:
        return None
    start, count, geometry, kind = (np.concatenate(c) for c in zip(*[
        (pos, n, geom, np.full(len(pos), k, dtype=np.int8)) for pos, n, geom, k in walk.blocks],
        strict=True))
    order = np.argsort(start, kind="stable")
    return WkbLayout(data, offsets, types.astype(np.uint32), start[order], count[order],
                     geometry[order], kind[order])
