"""The point-array path of ``transform_chunk_bytes``: a chunk of plain 2D points through a
recipe of geometry-preserving steps, on coordinate arrays, with no GEOS object made.

Points are the largest layers (a sensor feed, addresses, events), and for them the general
path's cost is mostly making GEOS objects: one per point when the chunk is read, another
per point after reprojection, each about a microsecond, while the reprojection itself (one
PROJ call over two float arrays) and the WKB (one strided array) are a fraction of that.

Taken only when the result is the general path's, byte for byte (tests compare them):

- every step is ``reproject``, ``make_valid`` or ``drop_empty``. On a chunk whose geometries
  are all non-empty, non-NULL 2D points with finite coordinates, ``make_valid`` and
  ``drop_empty`` find nothing to do (such a point is valid, and neither empty nor NULL);
- every geometry is a plain 2D point in little-endian WKB (``libs.geoparquet.point_records``);
- the reprojection leaves every coordinate finite (a point outside the target CRS's area
  of use is rejected by the general path, which then runs instead);
- the plan's columns are ``_row_id`` and the chunk's attributes, in order.

Anything else returns None and the caller runs the general path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
from pyproj import CRS

from libs.geoparquet import GEOMETRY, encode_columns, point_records, point_wkb
from libs.transformations.plan import parse_crs
from libs.transformations.recipe import ROW_ID, DropEmpty, MakeValid, RecipeStep, Reproject
from libs.transformations.steps import _transformer, add_row_ids

_NO_OP_ON_POINTS = (MakeValid, DropEmpty)


def transform_point_chunk(parts: tuple[pd.DataFrame, pa.Array, CRS | None],
                          steps: Sequence[RecipeStep], target_crs: str, row_offset: int,
                          planned: pa.Schema
                          ) -> tuple[bytes, tuple[float, float, float, float] | None, int] | None:
    """(GeoParquet bytes, bbox, rows) of the transformed chunk (decoded by
    ``libs.geoparquet.read_wkb_parts``), or None when the chunk or the recipe is outside
    this path (see the module docstring)."""
    if not all(isinstance(s, (Reproject, *_NO_OP_ON_POINTS)) for s in steps):
        return None
    attributes, wkb, crs = parts
    records = point_records(wkb)  # None unless every value is a plain 2D point
    if crs is None or records is None:
        return None
    x, y = np.ascontiguousarray(records["x"]), np.ascontiguousarray(records["y"])
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    target = parse_crs(target_crs, "target_crs")
    current: CRS = crs
    for step in steps:
        if isinstance(step, Reproject) and not current.equals(target):
            x, y = _transformer(current.to_wkt(), target.to_wkt()).transform(x, y)
            current = target
            if not (np.isfinite(x).all() and np.isfinite(y).all()):
                return None
    if not current.equals(target):
        return None  # the general path raises the error that says so
    attributes = add_row_ids(attributes, row_offset)
    names = [n for n in planned.names if n != GEOMETRY]
    if names != list(attributes.columns) or names[:1] != [ROW_ID]:
        return None
    xy = np.column_stack([x, y])
    data_out, bbox, _ = encode_columns(
        attributes, point_wkb(x, y), np.column_stack([xy, xy]),
        np.zeros(len(x), dtype=bool), ["Point"], current)
    return data_out, bbox, len(x)

