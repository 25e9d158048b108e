"""The coordinate-array path of ``transform_chunk_bytes``: a chunk of plain 2D geometries
through a recipe of geometry-preserving steps, on coordinate arrays, with as few GEOS objects
as the result allows (none for points and lines).

For the large layers the general path's cost is mostly GEOS objects: one per geometry when
the chunk is read, a clone per geometry to set the reprojected coordinates, a validity check,
then the WKB written back, while the reprojection itself is one PROJ call over two float
arrays. Here the chunk's WKB is walked with numpy (a cursor per geometry, one pass per
ring or part index), its coordinates are reprojected in one call and written back into a
copy of the same bytes: the headers and counts do not change, so the result is the WKB GEOS
would write. Bounds come from the coordinates (of the exterior rings, as GEOS's envelope).

Taken only when the result is the general path's, byte for byte (tests compare them):

- every step is ``reproject``, ``make_valid`` or ``drop_empty``;
- every geometry is a non-empty, non-NULL 2D Point, LineString, Polygon, MultiPoint,
  MultiLineString or MultiPolygon in little-endian ISO WKB with finite coordinates, every
  part non-empty, every ring closed with at least 4 points, every line with at least 2. On
  such a chunk ``drop_empty`` finds nothing to do;
- ``make_valid`` checks every geometry when it runs (points always are valid; a line, or
  each line of a MultiLineString, needs two distinct consecutive points, checked on the
  arrays; polygons are asked of GEOS, a slice at a time). Under ``policy: repair`` the rows
  it finds invalid are repaired by the general path's GEOS call and spliced into the output;
  the chunk goes to the general path when the policy rejects or fails them, when a repair
  comes out empty, or when a reprojection would follow a repair;
- the reprojection leaves every coordinate finite (a geometry outside the target CRS's area
  of use is rejected by the general path);
- the plan's columns are ``_row_id`` and the chunk's attributes, in order.

Anything else returns None and the caller runs the general path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
import pyarrow as pa
import shapely
from pyproj import CRS, Transformer

from libs.geoparquet import (
    GEOMETRY,
    BBox,
    encode_columns,
    geometry_type_names,
    point_records,
    point_wkb,
)
from libs.transformations.plan import parse_crs
from libs.transformations.recipe import ROW_ID, DropEmpty, MakeValid, RecipeStep, Reproject
from libs.transformations.steps import _transformer, add_row_ids, keep_multi

_TYPE_NAMES = {1: "Point", 2: "LineString", 3: "Polygon", 4: "MultiPoint",
               5: "MultiLineString", 6: "MultiPolygon"}
_PART_OF = {4: 1, 5: 2, 6: 3}  # Multi* type code -> the type code of its parts
# Coordinate blocks: a point, a line, a polygon's exterior ring, an interior ring.
_POINT, _LINE, _SHELL, _HOLE = 0, 1, 2, 3
# Above this many rings or parts in one geometry the per-index passes cost more than GEOS.
_MAX_PASSES = 1_024
_VALIDITY_SLICE = 32_768  # polygons per GEOS validity call: bounds the GEOS objects alive


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
    kind: np.ndarray  # int8 per block: _POINT, _LINE, _SHELL, _HOLE

    def coordinate_mask(self) -> np.ndarray:
        """A bool per byte of ``data``: True on the coordinates' bytes."""
        delta = np.zeros(len(self.data) + 1, dtype=np.int8)
        delta[self.start] = 1
        delta[self.start + 16 * self.count] = -1  # blocks never touch: a header lies between
        return np.cumsum(delta[:-1], dtype=np.int8).view(bool)

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
            return self.coordinates(pos, geom, np.ones(len(pos), dtype=np.int64), _POINT)
        if code == 2:
            n = self.count(pos, geom, 2)
            return self.coordinates(pos + 4, geom, n, _LINE)
        parts = self.count(pos, geom, 1)  # rings of a polygon, parts of a Multi*
        if int(parts.max()) > _MAX_PASSES:
            raise _NotPlain("too many rings or parts for the array path")
        pos = pos + 4
        for index in range(int(parts.max())):
            active = np.flatnonzero(parts > index)
            at, of = pos[active], geom[active]
            if code == 3:
                n = self.count(at, of, 4)
                pos[active] = self.coordinates(at + 4, of, n, _SHELL if index == 0 else _HOLE)
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
            if int(code) not in _TYPE_NAMES:
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


def _invalid(layout: WkbLayout, wkb: pa.Array, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per geometry, invalid per GEOS at coordinates ``x, y`` (``wkb``: the values with
    those coordinates). Points always are valid; a line (each line of a MultiLineString)
    needs two distinct consecutive points, checked here; polygons are asked of GEOS, a slice
    at a time."""
    invalid = np.zeros(len(layout.types), dtype=bool)
    lines = layout.kind == _LINE
    if lines.any():
        first, last = (ends[lines] for ends in layout.coordinate_ranges())
        moves = np.concatenate([[0], np.cumsum((x[1:] != x[:-1]) | (y[1:] != y[:-1]))])
        invalid[layout.geometry[lines][moves[last] == moves[first]]] = True
    polygons = np.flatnonzero(np.isin(layout.types, (3, 6)))
    if len(polygons):
        for begin in range(0, len(polygons), _VALIDITY_SLICE):
            chosen = polygons[begin:begin + _VALIDITY_SLICE]
            geoms = shapely.from_wkb(wkb.take(pa.array(chosen)).to_numpy(zero_copy_only=False))
            invalid[chosen[~shapely.is_valid(geoms)]] = True
    return invalid


def _repaired(wkb: pa.Array, rows: np.ndarray) -> np.ndarray | None:
    """``make_valid(policy="repair")`` of the values ``rows`` of ``wkb`` as the general path
    repairs them (the same GEOS call, Multi* kept), or None when a repair comes out empty
    (the general path's later steps may reject it)."""
    before = shapely.from_wkb(wkb.take(pa.array(rows)).to_numpy(zero_copy_only=False))
    after = keep_multi(before, shapely.make_valid(before, method="structure",
                                                  keep_collapsed=False))
    if (shapely.is_missing(after) | shapely.is_empty(after)).any():
        return None
    return after


def _spliced(wkb: pa.Array, rows: np.ndarray, replacements: list[bytes]) -> pa.Array:
    """``wkb`` (32-bit offsets from 0) with the values at the sorted ``rows`` replaced."""
    _, offsets, values = wkb.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int32, count=len(wkb) + 1).astype(np.int64)
    data = memoryview(values)
    lengths = np.diff(offsets)
    lengths[rows] = [len(r) for r in replacements]
    pieces, at = [], 0
    for row, value in zip(rows.tolist(), replacements, strict=True):
        pieces += [data[at:int(offsets[row])], value]
        at = int(offsets[row + 1])
    pieces.append(data[at:int(offsets[-1])])
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.Array.from_buffers(pa.binary(), len(wkb), [None, pa.py_buffer(new_offsets),
                                                         pa.py_buffer(b"".join(pieces))])


def _bounds(layout: WkbLayout, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n, 4) per geometry, of every coordinate but the interior rings' (GEOS's envelope)."""
    counted = np.repeat(layout.kind != _HOLE, layout.count)
    geometry = np.repeat(layout.geometry, layout.count)[counted]
    x, y = x[counted], y[counted]
    first = np.searchsorted(geometry, np.arange(len(layout.types)))
    return np.column_stack([np.minimum.reduceat(x, first), np.minimum.reduceat(y, first),
                            np.maximum.reduceat(x, first), np.maximum.reduceat(y, first)])


def _transform(layout: WkbLayout | None, source: CRS, target: CRS, x: np.ndarray,
               y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # The transformers the general path uses: steps.reproject's for a chunk of plain points,
    # GeoDataFrame.to_crs's (from the CRS objects) for anything else.
    if layout is None or (layout.types == 1).all():
        return _transformer(source.to_wkt(), target.to_wkt()).transform(x, y)
    return _crs_transformer(source, target).transform(x, y)


@lru_cache(maxsize=16)
def _crs_transformer(source: CRS, target: CRS) -> Transformer:
    return Transformer.from_crs(source, target, always_xy=True)


def transform_array_chunk(parts: tuple[pd.DataFrame, pa.Array, CRS | None],
                          steps: Sequence[RecipeStep], target_crs: str, row_offset: int,
                          planned: pa.Schema
                          ) -> tuple[bytes, BBox | None, int, list[str]] | None:
    """(GeoParquet bytes, bbox, rows, geometry types) of the transformed chunk (decoded by
    ``libs.geoparquet.read_wkb_parts``), or None when the chunk or the recipe is outside
    this path (see the module docstring)."""
    if not all(isinstance(s, (Reproject, MakeValid, DropEmpty)) for s in steps):
        return None
    attributes, wkb, crs = parts
    if crs is None:
        return None
    records = point_records(wkb)  # plain points: one strided array, no walk needed
    layout = None if records is not None else wkb_layout(wkb)
    if records is not None:
        x, y = np.ascontiguousarray(records["x"]), np.ascontiguousarray(records["y"])
    elif layout is not None:
        mask = layout.coordinate_mask()
        xy = layout.data[mask].view("<f8").reshape(-1, 2)
        x, y = np.ascontiguousarray(xy[:, 0]), np.ascontiguousarray(xy[:, 1])
        rings = layout.kind >= _SHELL
        first, last = (ends[rings] for ends in layout.coordinate_ranges())
        if not ((x[first] == x[last]) & (y[first] == y[last])).all():
            return None  # an unclosed ring: GEOS refuses to read it
    else:
        return None
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    target = parse_crs(target_crs, "target_crs")
    current: CRS = crs
    # rows make_valid repaired (sorted) and their GEOS geometries; never moved again
    patched, repairs = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object)
    current_wkb = None  # the WKB at the current coordinates, once something needed it
    for step in steps:
        if isinstance(step, Reproject) and not current.equals(target):
            if len(patched):
                return None  # a repaired geometry would need reprojecting: the general path
            x, y = _transform(layout, current, target, x, y)
            current, current_wkb = target, None
            if not (np.isfinite(x).all() and np.isfinite(y).all()):
                return None
        elif isinstance(step, MakeValid) and layout is not None:
            if len(patched) and not shapely.is_valid(repairs).all():
                return None
            if current_wkb is None:
                current_wkb = layout.with_coordinates(mask, np.column_stack([x, y]))
            invalid = _invalid(layout, current_wkb, x, y)
            invalid[patched] = False
            if not invalid.any():
                continue
            if step.policy != "repair":
                return None  # rejects, or the failure naming the row: the general path's
            rows = np.flatnonzero(invalid)
            repaired = _repaired(current_wkb, rows)
            if repaired is None:
                return None
            order = np.argsort(np.concatenate([patched, rows]), kind="stable")
            patched = np.concatenate([patched, rows])[order]
            repairs = np.concatenate([repairs, repaired])[order]
    if not current.equals(target):
        return None  # the general path raises the error that says so
    attributes = add_row_ids(attributes, row_offset)
    names = [n for n in planned.names if n != GEOMETRY]
    if names != list(attributes.columns) or names[:1] != [ROW_ID]:
        return None
    if layout is None:
        xy = np.column_stack([x, y])
        out_wkb, bounds, types = point_wkb(x, y), np.column_stack([xy, xy]), ["Point"]
    else:
        out_wkb = (layout.with_coordinates(mask, np.column_stack([x, y])) if current_wkb is None
                   else current_wkb)
        bounds = _bounds(layout, x, y)
        kept = np.ones(len(layout.types), dtype=bool)
        kept[patched] = False
        types = sorted({_TYPE_NAMES[int(c)] for c in np.unique(layout.types[kept])}
                       | set(geometry_type_names(repairs) if len(repairs) else []))
        if len(patched):
            out_wkb = _spliced(out_wkb, patched, list(shapely.to_wkb(repairs, flavor="iso")))
            bounds[patched] = shapely.bounds(repairs)
    data_out, bbox, _ = encode_columns(attributes, out_wkb, bounds,
                                       np.zeros(len(wkb), dtype=bool), types, current)
    return data_out, bbox, len(wkb), types
