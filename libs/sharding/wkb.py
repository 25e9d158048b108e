"""Geometry facts read from WKB, validated: type codes, bounds, one geometry family per layer.

Point bounds come straight from the WKB bytes (strided numpy views, no parsing); plain
lines and polygons (and their Multi* forms) from their coordinates, found by walking the WKB
with numpy (``libs.wkb_layout``); anything else is parsed with shapely, at most
``PARSE_BYTES`` of WKB at a time, and so is a batch the walk or its checks refuse (a
broken geometry then gets shapely's verdict, which the error message reports).

Vertices are counted (``over_vertex_limit``) before any of that: a 2D vertex takes 16 bytes
of WKB, so only values longer than 16 bytes per allowed vertex are counted at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import shapely

from libs.errors import InputDataError
from libs.sharding.columns import binary_parts
from libs.wkb_layout import wkb_layout

#: WKB parsed with shapely at a time (GEOS objects and coordinate copies are several times
#: the WKB's size).
PARSE_BYTES = 32 * 2**20
_TYPE_NAMES = {1: "Point", 2: "LineString", 3: "Polygon", 4: "MultiPoint", 5: "MultiLineString",
               6: "MultiPolygon", 7: "GeometryCollection", 8: "CircularString",
               9: "CompoundCurve", 10: "CurvePolygon", 11: "MultiCurve", 12: "MultiSurface",
               15: "PolyhedralSurface", 16: "TIN", 17: "Triangle"}
_FAMILIES = {1: "point", 4: "point", 2: "line", 5: "line", 3: "polygon", 6: "polygon"}


@dataclass
class WkbHeaders:
    """The geometry type of each row of a WKB array, read from its first five bytes."""

    valid: np.ndarray  # bool: a geometry is present
    kind: np.ndarray  # int: 1..17 (0 where missing)
    has_z: np.ndarray  # bool
    dims_xy: np.ndarray  # bool: plain 2D/ISO Z without EWKB extras (point fast path)
    little: np.ndarray  # bool

    def type_codes(self) -> np.ndarray:
        """``kind * 2 + has_z`` per row as uint8, 0 where no geometry (the type code column)."""
        return np.where(self.valid, self.kind * 2 + self.has_z, 0).astype(np.uint8)

    def type_names(self) -> list[str]:
        """The sorted names of the geometry types present, e.g. ``['Point', 'Point Z']``."""
        present = self.valid & (self.kind > 0)
        return type_code_names(self.kind[present] * 2 + self.has_z[present])


def _wkb_headers(array: pa.Array) -> tuple[WkbHeaders, np.ndarray, np.ndarray, np.ndarray]:
    starts, lengths, data = binary_parts(array)
    valid = array.is_valid().to_numpy(zero_copy_only=False) & (lengths > 0)
    n = len(array)
    kind = np.zeros(n, np.int64)
    has_z = np.zeros(n, bool)
    plain = np.zeros(n, bool)
    little = np.zeros(n, bool)
    readable = valid & (lengths >= 5)
    if readable.any():
        size = int(lengths[0])
        if readable.all() and (lengths == size).all():
            # Fixed-size records (points): the headers are a strided view, no gather.
            header = data[starts[0]: starts[0] + n * size].reshape(n, size)[:, :5]
        else:
            header = data[starts[readable][:, None] + np.arange(5)]  # byte order, uint32 type
        order = header[:, 0]
        raw = np.ascontiguousarray(header[:, 1:5])
        code = np.where(order == 1, raw.view("<u4")[:, 0], raw.view(">u4")[:, 0]).astype(np.int64)
        ewkb_z = (code & 0x80000000) != 0
        ewkb_extra = (code & 0x60000000) != 0  # M or SRID flag
        base = code & 0x0FFFFFFF
        iso_dims = base // 1000
        kind[readable] = np.where(order <= 1, base % 1000, 0).astype(np.int64)
        has_z[readable] = ewkb_z | (iso_dims == 1) | (iso_dims == 3)
        plain[readable] = ~ewkb_extra & ((iso_dims == 0) | (iso_dims == 1)) & (order <= 1)
        little[readable] = order == 1
    return WkbHeaders(valid, kind, has_z, plain, little), starts, lengths, data


def count_vertices(array: pa.Array) -> np.ndarray:
    """The number of vertices (coordinates) of each geometry of a WKB array (0 where NULL).

    Plain geometries are counted from the WKB walk, without parsing; others with shapely."""
    counts = np.zeros(len(array), np.int64)
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    if not valid.any():
        return counts
    present = array if valid.all() else array.filter(pa.array(valid))
    layout = wkb_layout(present)
    if layout is not None:
        counted = np.bincount(layout.geometry, weights=layout.count, minlength=len(present))
    else:
        geoms = shapely.from_wkb(present.to_numpy(zero_copy_only=False), on_invalid="ignore")
        counted = shapely.get_num_coordinates(geoms)
    counts[valid] = np.asarray(counted, np.int64)
    return counts


def over_vertex_limit(array: pa.Array, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a WKB array whose geometry has more than ``limit`` vertices, and their
    counts. A vertex takes at least 16 bytes, so only longer values are counted at all."""
    _, lengths, _ = binary_parts(array)
    candidates = np.flatnonzero(lengths > 16 * limit)
    if not len(candidates):
        return candidates, np.zeros(0, np.int64)
    counts = count_vertices(array.take(pa.array(candidates)))
    over = counts > limit
    return candidates[over], counts[over]


def _type_name(kind: int, has_z: bool) -> str:
    return _TYPE_NAMES.get(kind, f"WKB type {kind}") + (" Z" if has_z else "")


def type_code_names(codes: np.ndarray) -> list[str]:
    """Type names of ``kind * 2 + has_z`` codes (0: no geometry)."""
    present = np.flatnonzero(np.bincount(codes.astype(np.int64)))
    return sorted(_type_name(int(code) // 2, bool(code % 2)) for code in present if code)


def _not_finite(where: str, row: int) -> InputDataError:
    return InputDataError(f"{where}, row {row}: coordinates are NaN or infinite; expected finite "
                          "numbers")


def _point_coordinates(headers: WkbHeaders, starts: np.ndarray, lengths: np.ndarray,
                       data: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """x and y of an all-point batch read straight from the WKB bytes, or None if not one."""
    valid = headers.valid
    if not valid.any():
        return np.full(len(valid), np.nan), np.full(len(valid), np.nan)
    kinds, plain, little = headers.kind[valid], headers.dims_xy[valid], headers.little[valid]
    if not ((kinds == 1).all() and plain.all() and (little.all() or not little.any())):
        return None
    size = np.where(headers.has_z[valid], 29, 21)
    if not (lengths[valid] == size).all():
        return None
    dtype = np.dtype("<f8" if little[0] else ">f8")
    stride = int(size[0])
    if valid.all() and (size == stride).all():
        # Contiguous fixed-size records: strided views over the buffer, no gather.
        offset = int(starts[0])
        x, y = (np.ndarray((len(valid),), dtype, buffer=data, offset=offset + at, strides=(stride,))
                for at in (5, 13))
        return x.astype(np.float64), y.astype(np.float64)
    at = starts[valid]
    x, y = np.full(len(valid), np.nan), np.full(len(valid), np.nan)
    x[valid] = data[at[:, None] + np.arange(5, 13)].view(dtype).ravel()
    y[valid] = data[at[:, None] + np.arange(13, 21)].view(dtype).ravel()
    return x, y


def geometry_bounds(array: pa.Array, where: str,
                    first_row: int) -> tuple[list[np.ndarray], WkbHeaders]:
    """minx, miny, maxx, maxy per row (NaN for missing/empty geometries) and the rows' type
    headers; raises :class:`InputDataError` naming the row for unsupported or broken WKB."""
    headers, starts, lengths, data = _wkb_headers(array)
    broken = headers.valid & (headers.kind == 0)
    unsupported = headers.valid & ~np.isin(headers.kind, list(_FAMILIES))
    if broken.any() or unsupported.any():
        row = int(np.flatnonzero(broken | unsupported)[0])
        if headers.kind[row] == 7:
            raise InputDataError(
                f"{where}, row {first_row + row}: GeometryCollection is not supported; expected "
                "Point, LineString or Polygon (or their Multi* forms) — explode collections first"
            )
        if headers.kind[row] == 0:
            raise InputDataError(f"{where}, row {first_row + row}: the geometry is not valid WKB")
        raise InputDataError(
            f"{where}, row {first_row + row}: {_type_name(int(headers.kind[row]), False)} "
            "geometries are not supported; expected Point, LineString or Polygon (or Multi*) — "
            "convert curves to linear geometries first (e.g. ogr2ogr -nlt CONVERT_TO_LINEAR)"
        )
    points = _point_coordinates(headers, starts, lengths, data)
    if points is not None:
        x, y = points
        x_nan, y_nan = np.isnan(x), np.isnan(y)
        # WKB's POINT EMPTY is (NaN, NaN); anything else non-finite is bad data.
        bad = (x_nan != y_nan) | np.isinf(x) | np.isinf(y)
        if bad.any():
            raise _not_finite(where, first_row + int(np.flatnonzero(bad)[0]))
        return [x, y, x, y], headers
    walked = walked_bounds(array, headers.valid)
    if walked is not None:
        return walked, headers
    bounds = np.empty((len(array), 4))
    # Parse at most ~PARSE_BYTES of WKB at a time: a batch of large polygons would otherwise
    # hold several times its size in GEOS objects and coordinate copies.
    start = 0
    cumulative = np.cumsum(lengths)
    while start < len(array):
        base = cumulative[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(cumulative, base + PARSE_BYTES, side="right")))
        _parse_bounds(array.slice(start, stop - start), headers.valid[start:stop],
                      bounds[start:stop], where, first_row + start)
        start = stop
    return [np.ascontiguousarray(bounds[:, i]) for i in range(4)], headers


def walked_bounds(array: pa.Array, valid: np.ndarray) -> list[np.ndarray] | None:
    """Bounds of a batch of plain geometries from their coordinates (NaN where ``valid`` is
    False), or None when the walk refuses a value or GEOS would refuse to read one (an
    unclosed ring, a coordinate that is not finite): the caller parses with shapely then."""
    present = array if valid.all() else array.filter(pa.array(valid))
    layout = wkb_layout(present) if len(present) else None
    if layout is None:
        return None
    x, y = layout.coordinates()
    if not (np.isfinite(x).all() and np.isfinite(y).all() and layout.rings_closed(x, y)):
        return None
    walked = layout.bounds(x, y)
    if len(present) != len(array):
        bounds = np.full((len(array), 4), np.nan)
        bounds[valid] = walked
        walked = bounds
    return [np.ascontiguousarray(walked[:, i]) for i in range(4)]


def _parse_bounds(array: pa.Array, valid: np.ndarray, out: np.ndarray, where: str,
                  first_row: int) -> None:
    geoms = shapely.from_wkb(array.to_numpy(zero_copy_only=False), on_invalid="ignore")
    unreadable = valid & shapely.is_missing(geoms)
    if unreadable.any():
        row = int(np.flatnonzero(unreadable)[0])
        raise InputDataError(f"{where}, row {first_row + row}: the geometry is not valid WKB")
    coords, index = shapely.get_coordinates(geoms, return_index=True)
    finite = np.isfinite(coords).all(axis=1)
    if not finite.all():
        raise _not_finite(where, first_row + int(index[np.flatnonzero(~finite)[0]]))
    out[:] = shapely.bounds(geoms)


#: Family of each WKB type code (index), 0 for none: 1 point, 2 line, 3 polygon.
_FAMILY_OF_KIND = np.zeros(64, np.int8)
_FAMILY_OF_KIND[[1, 4]], _FAMILY_OF_KIND[[2, 5]], _FAMILY_OF_KIND[[3, 6]] = 1, 2, 3
_FAMILY_CODES = {"point": 1, "line": 2, "polygon": 3}


def family_rows(array: pa.Array, family: str) -> tuple[np.ndarray, np.ndarray]:
    """For geometry_families 'split': a mask of the rows of ``family`` ('point', 'line',
    'polygon'; Multi* included), and the indices of the rows of no family (no geometry, a
    GeometryCollection, a curve), which no split layer can take."""
    headers = _wkb_headers(array)[0]
    codes = np.where(headers.valid, _FAMILY_OF_KIND[np.clip(headers.kind, 0, 63)], 0)
    return codes == _FAMILY_CODES[family], np.flatnonzero(codes == 0)


def geometry_problems(array: pa.Array) -> dict[int, str]:
    """Rows of a WKB array whose geometry PostGIS would refuse, with why: WKB GEOS cannot read
    (truncated bytes, an unclosed ring, a line of one point) or coordinates that are NaN or
    infinite. Slow (parses every geometry): for a batch ``geometry_bounds`` refused."""
    problems: dict[int, str] = {}
    headers, _, lengths, _ = _wkb_headers(array)
    cumulative, start = np.cumsum(lengths), 0
    while start < len(array):  # at most ~PARSE_BYTES of WKB parsed at a time
        base = cumulative[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(cumulative, base + PARSE_BYTES, side="right")))
        values = array.slice(start, stop - start).to_numpy(zero_copy_only=False).copy()
        # other types (curves, collections) are not one row's fault: the caller's error stays
        values[~np.isin(headers.kind[start:stop], [0, *_FAMILIES])] = None
        geoms = shapely.from_wkb(values, on_invalid="ignore")
        missing = headers.valid[start:stop] & shapely.is_missing(geoms) & (values != None)  # noqa: E711
        for row in np.flatnonzero(missing).tolist():
            problems[start + row] = _unreadable(values[row])
        coords, index = shapely.get_coordinates(geoms, return_index=True)
        for row in np.unique(index[~np.isfinite(coords).all(axis=1)]).tolist():
            problems[start + row] = "coordinates are NaN or infinite; expected finite numbers"
        start = stop
    return dict(sorted(problems.items()))


def _unreadable(value: bytes) -> str:
    """Why GEOS refuses one WKB value, in its own words (it names the defect)."""
    try:
        shapely.from_wkb(value)
    except shapely.errors.ShapelyError as exc:
        detail = str(exc).split(":", 1)[-1].strip() or type(exc).__name__
        return f"the geometry cannot be read ({detail}); expected valid WKB"
    return "the geometry cannot be read; expected valid WKB"


def check_one_family(headers: WkbHeaders, families: dict[str, tuple[str, str, int]], file: str,
                     where: str, first_row: int, layer: str,
                     origin: np.ndarray | None = None) -> None:
    """Record the geometry families of a batch in ``families`` (family -> first file, type and
    row seen) and raise :class:`InputDataError` once a layer holds more than one. ``origin``:
    each row's position in the batch as read, when rows were set apart since."""
    present = headers.valid
    kinds = headers.kind[present]
    if not len(kinds):
        return
    rows = np.flatnonzero(present) if origin is None else origin[present]
    for kind in np.flatnonzero(np.bincount(kinds)).tolist():
        family = _FAMILIES[kind]
        row = first_row + int(rows[np.argmax(kinds == kind)])
        families.setdefault(family, (file, _TYPE_NAMES[kind], row))
    if len(families) > 1:
        (file1, type1, row1), (file2, type2, row2) = list(families.values())[:2]
        if file1 == file2:
            detail = f"{where} mixes {type1} (row {row1}) and {type2} (row {row2}) geometries"
        else:
            detail = (f"layer {layer!r} mixes {type1} (file {file1!r}, row {row1}) and {type2} "
                      f"(file {file2!r}, row {row2}) geometries")
        raise InputDataError(
            f"{detail}; expected one geometry family per layer (points, lines or polygons; "
            "Multi* of the same family is fine) — split the file into one layer per type"
        )
