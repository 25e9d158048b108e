"""The coordinate-array path of ``transform_chunk_bytes``: a chunk of plain 2D geometries
through a recipe of geometry-preserving steps, on coordinate arrays, with as few GEOS objects
as the result allows (none for points and lines).

The general path's cost for the large layers is GEOS objects (one per geometry read, a clone
to set reprojected coordinates, the WKB written back), while the reprojection itself is one
PROJ call. Here the WKB is walked with numpy, its coordinates reprojected in one call and
written back into a copy of the same bytes, whose headers and counts do not change: the
result is the WKB GEOS would write. ``make_valid`` asks GEOS about polygons only, and the rows
it finds invalid are repaired by the general path's call and spliced in.

Taken only when the result is the general path's, byte for byte (tests compare them): steps
``reproject`` (without ``clip_to_domain``), ``make_valid`` or ``drop_empty`` only, non-empty
finite 2D little-endian ISO WKB inside the source and target CRSs' domains, attributes
unchanged. Anything else returns None and the caller runs the general path.
The exact conditions and what the path bought: see docs/transform-arrays.md.
"""

from __future__ import annotations

from collections.abc import Sequence
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
from libs.manifest.recipe import ROW_ID, DropEmpty, MakeValid, RecipeStep, Reproject
from libs.transformations.domain import domain_of
from libs.transformations.plan import parse_crs
from libs.transformations.steps import add_row_ids, cached_transformer, keep_multi
from libs.wkb_layout import LINE, TYPE_NAMES, WkbLayout, wkb_layout

_VALIDITY_SLICE = 32_768  # polygons per GEOS validity call: bounds the GEOS objects alive


def _invalid(layout: WkbLayout, wkb: pa.Array, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per geometry, invalid per GEOS at coordinates ``x, y`` (``wkb``: the values with
    those coordinates). Points always are valid; a line (each line of a MultiLineString)
    needs two distinct consecutive points, checked here; polygons are asked of GEOS, a slice
    at a time."""
    invalid = np.zeros(len(layout.types), dtype=bool)
    lines = layout.kind == LINE
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


def _inside(crs: CRS, x: np.ndarray, y: np.ndarray) -> bool:
    """Every (finite) coordinate inside ``crs``'s domain (``libs.transformations.domain``)."""
    box = domain_of(crs)
    return box is None or box.holds(x, y)


def _transform(layout: WkbLayout | None, source: CRS, target: CRS, x: np.ndarray,
               y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # The transformers the general path uses: steps.reproject's for a chunk of plain points,
    # GeoDataFrame.to_crs's (from the CRS objects) for anything else.
    if layout is None or (layout.types == 1).all():
        return cached_transformer(source.to_wkt(), target.to_wkt()).transform(x, y)
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
        x, y = layout.coordinates(mask)
        if not layout.rings_closed(x, y):
            return None  # an unclosed ring: GEOS refuses to read it
    else:
        return None
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    if not _inside(crs, x, y) or any(isinstance(s, Reproject) and s.clip_to_domain
                                     for s in steps):
        return None  # rejects, a failure or clamping: the general path's (steps.reproject)
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
            if not (np.isfinite(x).all() and np.isfinite(y).all()) or not _inside(target, x, y):
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
    # the coordinate-sized arrays go as soon as they are used: a worker keeps the pages of its
    # largest chunk, so this task's peak is what it holds through the stage
    if layout is None:
        xy = np.column_stack([x, y])
        out_wkb, bounds, types = point_wkb(x, y), np.column_stack([xy, xy]), ["Point"]
        del x, y, xy
    else:
        out_wkb = (layout.with_coordinates(mask, np.column_stack([x, y])) if current_wkb is None
                   else current_wkb)
        del mask
        bounds = layout.bounds(x, y)
        del x, y
        kept = np.ones(len(layout.types), dtype=bool)
        kept[patched] = False
        types = sorted({TYPE_NAMES[int(c)] for c in np.unique(layout.types[kept])}
                       | set(geometry_type_names(repairs) if len(repairs) else []))
        if len(patched):
            out_wkb = _spliced(out_wkb, patched, list(shapely.to_wkb(repairs, flavor="iso")))
            bounds[patched] = shapely.bounds(repairs)
    data_out, bbox, _ = encode_columns(attributes, out_wkb, bounds,
                                       np.zeros(len(wkb), dtype=bool), types, current)
    return data_out, bbox, len(wkb), types
