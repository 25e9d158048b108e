"""Recipe steps: pure functions from one chunk (a GeoDataFrame) to another.

Every step takes the frame, its recipe model and the manifest's ``target_crs`` and returns
a StepResult: the rows that go on, and the rows it took out (as they entered the step)
with one reason each. A step never drops a row without rejecting it, and never reorders
rows. The frame carries ``_row_id`` (see ``add_row_ids``), which reasons and errors quote.

Attribute columns are expected Arrow-backed (``pandas.ArrowDtype``, as ``chunk`` reads them)
so that an int64 column with NULLs stays int64 instead of becoming float64; numpy works too.

GEOS behaviours worth knowing:

- ``make_valid`` repairs with the ``structure`` method and ``keep_collapsed=False``: a
  polygon stays polygonal and a line lineal (a polygon that collapsed to a line becomes
  ``POLYGON EMPTY``, which ``drop_empty`` can then reject), so a layer keeps one geometry
  dimension. The default ``linework`` method can turn a polygon with a spike into a
  GEOMETRYCOLLECTION of a polygon and a line.
- ``make_valid`` is applied to invalid geometries only: on a valid polygon ``structure`` is
  not the identity (it rewrites the ring from another vertex, the other way round), which
  would change bytes for nothing.
- GEOS ``simplify`` (and ``make_valid``) turn a one-part MultiPolygon into a Polygon (same
  for lines and points). Both steps put such results back into their Multi* type, so a
  ``promote_to_multi`` earlier in the recipe still holds at the end.
- ``is_valid`` is true for empty geometries and false for NULL; NULL is never "invalid"
  (``drop_empty`` handles it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import shapely
from pyproj import CRS, Transformer

from libs.errors import TransformError
from libs.geoparquet import plain_points
from libs.manifest.recipe import (
    ROW_ID,
    Cast,
    Derive,
    DropDuplicates,
    DropEmpty,
    FilterAttribute,
    FilterBBox,
    Force2D,
    MakeValid,
    NormalizeColumnNames,
    PromoteToMulti,
    RecipeStep,
    Rename,
    Reproject,
    Simplify,
)
from libs.transformations import domain, predicates
from libs.transformations.casting import cast_array, show_value
from libs.transformations.naming import normalized_names
from libs.transformations.plan import measuring_crs_problem, parse_crs


@dataclass(frozen=True)
class StepResult:
    """What one step did to a chunk: the rows that go on and the rows it rejected."""

    frame: gpd.GeoDataFrame
    rejected: gpd.GeoDataFrame
    reasons: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.reasons) != len(self.rejected):
            raise ValueError(f"{len(self.rejected)} rejected rows but {len(self.reasons)} reasons")


def add_row_ids(frame: gpd.GeoDataFrame, row_offset: int) -> gpd.GeoDataFrame:
    """``frame`` with ``_row_id`` (``row_offset`` + position) as its first column, index reset."""
    if ROW_ID in frame.columns:
        raise TransformError(
            f"the chunk already has a column named {ROW_ID!r}, which the transform adds itself; "
            "rename or drop it in the source file")
    out = frame.reset_index(drop=True)
    ids = pa.array(np.arange(row_offset, row_offset + len(out), dtype=np.int64))
    out.insert(0, ROW_ID, pd.Series(pd.arrays.ArrowExtensionArray(ids), index=out.index))
    return out


def _keep_all(frame: gpd.GeoDataFrame) -> StepResult:
    return StepResult(frame, frame.iloc[:0])


def _split(frame: gpd.GeoDataFrame, reject: np.ndarray, reasons: list[str],
           out: gpd.GeoDataFrame | None = None) -> StepResult:
    """Rows of ``out`` (default: ``frame``) where ``reject`` is false go on; the others are
    rejected as they are in ``frame``. ``reasons`` has one entry per rejected row."""
    out = frame if out is None else out
    if not reject.any():
        return StepResult(out, frame.iloc[:0])
    return StepResult(out[~reject], frame[reject], reasons)


def _fail_on_first(step_name: str, frame: gpd.GeoDataFrame, reject: np.ndarray,
                   reasons: list[str], instead: str) -> None:
    """The ``fail`` policy: raise on the first row the step would reject."""
    if reject.any():
        first = int(np.flatnonzero(reject)[0])
        row_id = int(frame[ROW_ID].iloc[first])
        reason = reasons[0].removeprefix(f"{step_name}: ")
        raise TransformError(
            f"{step_name} failed on {ROW_ID} {row_id}: {reason} ({int(reject.sum())} row(s) of "
            f"the chunk affected); the step's policy is 'fail': fix the source data, or set "
            f"policy {instead} to go on without such rows failing the run")


def _geometries(frame: gpd.GeoDataFrame) -> np.ndarray:
    return np.asarray(frame.geometry.values, dtype=object)


def _with_geometries(frame: gpd.GeoDataFrame, geoms: np.ndarray) -> gpd.GeoDataFrame:
    out = frame.copy()
    out[frame.geometry.name] = gpd.GeoSeries(geoms, crs=frame.crs, index=frame.index)
    return out


def _non_finite(geoms: np.ndarray) -> np.ndarray:
    """Rows whose geometry has a NaN or infinite coordinate (NULL and empty are not)."""
    present = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    bounds = shapely.bounds(geoms)
    return present & ~np.isfinite(bounds).all(axis=1)


def _column(frame: gpd.GeoDataFrame, name: str) -> pa.Array:
    values = pa.array(frame[name])
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _attribute_columns(frame: gpd.GeoDataFrame) -> list[str]:
    return [c for c in frame.columns if c not in (ROW_ID, frame.geometry.name)]


def _chunk_crs(frame: gpd.GeoDataFrame, step_name: str) -> CRS:
    if frame.crs is None:
        raise TransformError(f"{step_name}: the chunk has no CRS; set source_crs for its file "
                             "in the manifest")
    return frame.crs


@lru_cache(maxsize=32)
def cached_transformer(source_wkt: str, target_wkt: str) -> Transformer:
    """An always-xy transformer between two CRSs (by WKT), built once per worker process."""
    return Transformer.from_crs(CRS.from_wkt(source_wkt), CRS.from_wkt(target_wkt), always_xy=True)


def _domain_rejects(geoms: np.ndarray, crs: CRS, side: str) -> dict[int, str]:
    """The rows (positions) with a coordinate outside ``crs``'s domain, each with a reason
    quoting its first offending coordinate. Most of the chunk outside but inside with x and
    y exchanged fails the chunk whatever the policy: its axes are swapped. Bounds find the
    rows (exact for a box); only theirs are looked at coordinate by coordinate."""
    box = domain.domain_of(crs)
    if box is None:
        return {}
    candidates = np.flatnonzero(domain.outside_rows(shapely.bounds(geoms), box))
    hollow = shapely.is_missing(geoms[candidates]) | shapely.is_empty(geoms[candidates])
    rows = candidates[~hollow]
    if not len(rows):
        return {}
    x, y, index = domain.coordinates(geoms[rows])
    _, first = domain.first_outside(x, y, index, len(rows), box)
    if side == "source":
        present = len(geoms) - int((shapely.is_missing(geoms) | shapely.is_empty(geoms)).sum())
        if domain.swapped(x, y, index, present, box):
            at = int(first[0])
            raise TransformError(
                f"reproject: {len(rows)} of {present} geometries of the chunk have coordinates "
                f"outside the source CRS {crs.name!r} ({box.what}), e.g. (x, y) = "
                f"({float(x[at])!r}, {float(y[at])!r}), and all of them would be inside as "
                "(y, x): did you swap x and y? Put longitude/easting first (a CSV's x_column), "
                "or fix the file's axis order, and land it under a new batch id")
    return {row: f"reproject: coordinate (x, y) = ({float(x[i])!r}, {float(y[i])!r}) is outside "
                 f"the {side} CRS {crs.name!r} ({box.what})"
            for row, i in zip(rows.tolist(), first.tolist(), strict=True)}


def refuse_m(geoms: np.ndarray, frame: gpd.GeoDataFrame, where: str) -> None:
    """Raise TransformError when a geometry to be reprojected carries M values: shapely builds
    no geometry with M from coordinates (geopandas' to_crs turns Z and M into NaN). M is kept
    where nothing moves the coordinates (a layer landed in the target CRS)."""
    has_m = shapely.has_m(geoms)
    if has_m.any():
        row = frame[ROW_ID].iloc[int(np.flatnonzero(has_m)[0])]
        raise TransformError(
            f"{where}: {int(has_m.sum())} of {len(geoms)} geometries carry M (measure) values, the first at "
            f"{ROW_ID} {row}; M cannot be reprojected (Z can). Add a 'force_2d' step before "
            "'reproject' in the layer's recipe to drop Z and M, or land the layer in the "
            "target CRS to keep M")


def _clamped(frame: gpd.GeoDataFrame, source: CRS, target: CRS) -> gpd.GeoDataFrame:
    """``clip_to_domain``: coordinates moved onto the source CRS's domain, then (projected
    target with an area of use) clamped in lon/lat to that area of use, so that polar data
    ends on the map's edge instead of millions of metres beyond it."""
    geoms = _geometries(frame)
    box = domain.domain_of(source)
    if box is not None:
        geoms = domain.clipped(geoms, box)
    area = domain.area_of_use_lonlat(target) if target.is_projected else None
    if area is not None and not source.equals(target):
        lonlat = source.geodetic_crs if source.is_projected else source
        there = cached_transformer(source.to_wkt(), lonlat.to_wkt())
        back = cached_transformer(lonlat.to_wkt(), source.to_wkt())

        def clamp(xy: np.ndarray) -> np.ndarray:
            lon, lat = (there.transform(xy[:, 0], xy[:, 1]) if source.is_projected
                        else (xy[:, 0], xy[:, 1]))
            lon, lat = area.clip(np.asarray(lon), np.asarray(lat))
            return domain.with_xy(xy, *(back.transform(lon, lat) if source.is_projected
                                        else (lon, lat)))

        geoms = shapely.transform(geoms, clamp, include_z=None)
    return _with_geometries(frame, geoms)


def reproject(frame: gpd.GeoDataFrame, step: Reproject, target_crs: str) -> StepResult:
    """Check the source CRS's domain, reproject to ``target_crs`` (a chunk already in it is
    not moved), check the target CRS's domain.

    A row with a coordinate outside either domain, or not finite after reprojection (outside
    the target CRS's area of use), is rejected, or fails the run under ``policy: fail``;
    ``clip_to_domain`` clamps instead (see ``_clamped``). See ``libs.transformations.domain``.
    """
    source = _chunk_crs(frame, step.step)
    target = parse_crs(target_crs, "target_crs")
    if step.clip_to_domain:
        frame = _clamped(frame, source, target)
    geoms = _geometries(frame)
    by_row = _domain_rejects(geoms, source, "source")
    if not source.equals(target):
        refuse_m(geoms, frame, step.step)
    if source.equals(target):
        projected = frame
    elif plain_points(geoms):
        # The same transformer as GeoDataFrame.to_crs, applied to one coordinate array and
        # the points made anew: half the GEOS work of cloning each point to set its coordinates.
        xy = shapely.get_coordinates(geoms)
        x, y = cached_transformer(source.to_wkt(), target.to_wkt()).transform(xy[:, 0], xy[:, 1])
        projected = frame.set_geometry(gpd.GeoSeries(shapely.points(x, y), crs=target,
                                                     index=frame.index, name=frame.geometry.name))
    else:
        projected = frame.to_crs(target)
    out_geoms = _geometries(projected)
    infinite = (f"reproject: coordinates are not finite in {target.name!r} (the geometry lies "
                "outside the target CRS's area of use)")
    for row in np.flatnonzero(_non_finite(out_geoms)).tolist():
        by_row.setdefault(row, infinite)
    if not source.equals(target):  # else the source's check was the target's
        for row, why in _domain_rejects(out_geoms, target, "target").items():
            by_row.setdefault(row, why)
    reject = np.zeros(len(frame), dtype=bool)
    reject[list(by_row)] = True
    reasons = [by_row[row] for row in np.flatnonzero(reject).tolist()]
    if step.policy == "fail":
        _fail_on_first(step.step, frame, reject, reasons, "'reject' (or clip_to_domain)")
    return _split(frame, reject, reasons, out=projected)


_MULTI_OF = {  # shapely type id of a single-part type -> (Multi* constructor, empty Multi*)
    0: (shapely.multipoints, "MULTIPOINT EMPTY"),
    1: (shapely.multilinestrings, "MULTILINESTRING EMPTY"),
    2: (shapely.multilinestrings, "MULTILINESTRING EMPTY"),  # LinearRing
    3: (shapely.multipolygons, "MULTIPOLYGON EMPTY"),
}


def keep_multi(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """``after`` with every single-part result of a Multi* input wrapped back into that Multi*
    type (GEOS returns a Polygon for a one-part MultiPolygon)."""
    before_ids, after_ids = shapely.get_type_id(before), shapely.get_type_id(after)
    empty = shapely.is_empty(after)
    out = after.copy()
    for multi_id, single_ids in ((4, (0,)), (5, (1, 2)), (6, (3,))):
        demoted = (before_ids == multi_id) & np.isin(after_ids, single_ids)
        make_multi, empty_wkt = _MULTI_OF[single_ids[0]]
        if (demoted & ~empty).any():
            out[demoted & ~empty] = make_multi(after[demoted & ~empty],
                                               indices=np.arange(int((demoted & ~empty).sum())))
        if (demoted & empty).any():
            out[demoted & empty] = shapely.from_wkt(empty_wkt)
    return out


def make_valid(frame: gpd.GeoDataFrame, step: MakeValid, target_crs: str) -> StepResult:
    """Invalid geometries (per GEOS; NULL is not invalid) are repaired, rejected, or fail."""
    geoms = _geometries(frame)
    invalid = ~shapely.is_valid(geoms) & ~shapely.is_missing(geoms)
    if not invalid.any():
        return _keep_all(frame)
    if step.policy == "repair":
        repaired = geoms.copy()
        repaired[invalid] = shapely.make_valid(geoms[invalid], method="structure",
                                               keep_collapsed=False)
        return _keep_all(_with_geometries(frame, keep_multi(geoms, repaired)))
    reasons = [f"make_valid: invalid geometry ({why})"
               for why in shapely.is_valid_reason(geoms[invalid])]
    if step.policy == "fail":
        _fail_on_first(step.step, frame, invalid, reasons, "'repair' or 'reject'")
    return _split(frame, invalid, reasons)


def drop_empty(frame: gpd.GeoDataFrame, step: DropEmpty, target_crs: str) -> StepResult:
    """Rows whose geometry is NULL or empty are rejected (or fail the run)."""
    geoms = _geometries(frame)
    missing = shapely.is_missing(geoms)
    empty = missing | shapely.is_empty(geoms)
    reasons = ["drop_empty: geometry is NULL" if m else "drop_empty: geometry is empty"
               for m in missing[empty]]
    if step.policy == "fail":
        _fail_on_first(step.step, frame, empty, reasons, "'reject'")
    return _split(frame, empty, reasons)


def promote_to_multi(frame: gpd.GeoDataFrame, step: PromoteToMulti, target_crs: str) -> StepResult:
    """Point/LineString/Polygon become one-part Multi*; Multi*, collections and NULL stay."""
    geoms = _geometries(frame)
    type_ids = shapely.get_type_id(geoms)
    if not np.isin(type_ids, list(_MULTI_OF)).any():
        return _keep_all(frame)
    promoted = geoms.copy()
    empty = shapely.is_empty(geoms)
    for type_id, (make_multi, empty_wkt) in _MULTI_OF.items():
        parts = (type_ids == type_id) & ~empty
        if parts.any():
            promoted[parts] = make_multi(geoms[parts], indices=np.arange(int(parts.sum())))
        hollow = (type_ids == type_id) & empty
        if hollow.any():
            promoted[hollow] = shapely.from_wkt(empty_wkt)
    return _keep_all(_with_geometries(frame, promoted))


def force_2d(frame: gpd.GeoDataFrame, step: Force2D, target_crs: str) -> StepResult:
    """Z and M dropped: each geometry keeps its x and y (NULL stays NULL)."""
    geoms = _geometries(frame)
    if not (shapely.has_z(geoms) | shapely.has_m(geoms)).any():
        return _keep_all(frame)
    return _keep_all(_with_geometries(frame, shapely.force_2d(geoms)))


def simplify(frame: gpd.GeoDataFrame, step: Simplify, target_crs: str) -> StepResult:
    """Topology-preserving Douglas-Peucker with ``tolerance`` in units of ``target_crs``."""
    crs = _chunk_crs(frame, step.step)
    target = parse_crs(target_crs, "target_crs")
    if not crs.equals(target):
        raise TransformError(
            f"simplify: the chunk is in {crs.name!r} but the tolerance is in units of "
            f"target_crs {target.name!r}; place reproject before simplify")
    geoms = _geometries(frame)
    simplified = shapely.simplify(geoms, step.tolerance, preserve_topology=True)
    return _keep_all(_with_geometries(frame, keep_multi(geoms, simplified)))


def _bbox_region(step: FilterBBox, crs: CRS, target_crs: str) -> shapely.Geometry:
    """The bbox as a geometry in ``crs``: densified (64 pieces along its longer side) before
    transforming, so that its edges follow the curve they become in ``crs``."""
    bbox_crs = parse_crs(step.crs or target_crs, "filter_bbox: crs")
    minx, miny, maxx, maxy = step.bbox
    region = shapely.box(minx, miny, maxx, maxy)
    if minx == maxx or miny == maxy:  # a degenerate box is a line or a point
        region = shapely.LineString([(minx, miny), (maxx, maxy)])
        if minx == maxx and miny == maxy:
            region = shapely.Point(minx, miny)
    if bbox_crs.equals(crs):
        return region
    longest = max(maxx - minx, maxy - miny)
    if longest > 0:
        region = shapely.segmentize(region, longest / 64)
    transformer = Transformer.from_crs(bbox_crs, crs, always_xy=True)
    region = shapely.transform(region, lambda xy: np.column_stack(transformer.transform(*xy.T)))
    if not np.isfinite(shapely.get_coordinates(region)).all():
        raise TransformError(
            f"filter_bbox: the bbox {list(step.bbox)} in {bbox_crs.name!r} does not transform "
            f"to the chunk's CRS {crs.name!r} (infinite coordinates); keep the bbox inside the "
            "area of use of both CRSs or give it in the chunk's CRS")
    return region


def filter_bbox(frame: gpd.GeoDataFrame, step: FilterBBox, target_crs: str) -> StepResult:
    """Keep rows whose geometry intersects the bbox (given in ``step.crs``, default
    ``target_crs``, and transformed to the chunk's CRS); NULL and empty never intersect."""
    region = _bbox_region(step, _chunk_crs(frame, step.step), target_crs)
    shapely.prepare(region)
    geoms = _geometries(frame)
    outside = ~shapely.intersects(region, geoms)
    missing = shapely.is_missing(geoms)
    empty = shapely.is_empty(geoms)
    where = f"bbox {list(step.bbox)} ({step.crs or target_crs})"
    reasons = [
        "filter_bbox: geometry is NULL" if m else "filter_bbox: geometry is empty" if e
        else f"filter_bbox: geometry does not intersect {where}"
        for m, e in zip(missing[outside], empty[outside], strict=True)
    ]
    return _split(frame, outside, reasons)


def filter_attribute(frame: gpd.GeoDataFrame, step: FilterAttribute, target_crs: str) -> StepResult:
    """Keep rows where the predicate holds; NULL never matches a comparison."""
    if step.column not in _attribute_columns(frame):
        raise TransformError(f"filter: column {step.column!r} does not exist; available columns: "
                             f"{_attribute_columns(frame)}")
    column = _column(frame, step.column)
    problem = predicates.value_problem(step, column.type)
    if problem:
        raise TransformError(f"filter: {predicates.describe(step)}: {problem}")
    fails = ~predicates.evaluate(step, column)
    reason = f"filter: {predicates.describe(step)} is false"
    null = np.asarray(pc.is_null(column, nan_is_null=True).to_numpy(zero_copy_only=False))
    null_reason = f"{reason} ({step.column} is NULL)"
    reasons = [null_reason if n else reason for n in null[fails]]
    return _split(frame, fails, reasons)


def _measure(step: Derive, geoms: np.ndarray) -> np.ndarray:
    if step.kind == "area":
        return shapely.area(geoms)
    if step.kind == "length":
        return shapely.length(geoms)
    centroids = shapely.centroid(geoms)
    return shapely.get_x(centroids) if step.kind == "centroid_x" else shapely.get_y(centroids)


def derive(frame: gpd.GeoDataFrame, step: Derive, target_crs: str) -> StepResult:
    """Add a float64 column measured on a copy of the geometry reprojected to ``step.crs``
    (default ``target_crs``); NULL for a NULL geometry and for the centroid of an empty one.

    A row whose geometry does not transform to that CRS (infinite coordinates) is rejected.
    """
    if step.column in frame.columns:
        raise TransformError(f"derive: column {step.column!r} already exists; available columns: "
                             f"{_attribute_columns(frame)}")
    crs = parse_crs(step.crs or target_crs, "derive: crs")
    problem = measuring_crs_problem(step.kind, crs)
    if problem:
        raise TransformError(f"derive {step.column!r}: {problem}")
    measured = frame.geometry if _chunk_crs(frame, step.step).equals(crs) else frame.geometry.to_crs(crs)
    geoms = _geometries(measured)
    bad = _non_finite(geoms)
    values = _measure(step, geoms)
    column = pa.array(values, mask=~np.isfinite(values), type=pa.float64())
    out = frame.copy()
    out[step.column] = pd.Series(pd.arrays.ArrowExtensionArray(column), index=frame.index)
    reason = (f"derive: the geometry cannot be measured in {crs.name!r} (coordinates not "
              "finite there: outside its area of use)")
    return _split(frame, bad, [reason] * int(bad.sum()), out=out)


def rename(frame: gpd.GeoDataFrame, step: Rename, target_crs: str) -> StepResult:
    """Rename attribute columns all at once (``{"a": "b", "b": "a"}`` swaps them)."""
    attributes = _attribute_columns(frame)
    missing = [old for old in step.columns if old not in attributes]
    if missing:
        raise TransformError(f"rename: column(s) {missing} do not exist; available columns: "
                             f"{attributes}")
    kept = [c for c in frame.columns if c not in step.columns]
    clashing = [new for new in step.columns.values() if new in kept]
    if clashing:
        raise TransformError(f"rename: new name(s) {clashing} clash with existing columns; "
                             f"available columns: {attributes}")
    return _keep_all(frame.rename(columns=dict(step.columns)))


def cast(frame: gpd.GeoDataFrame, step: Cast, target_crs: str) -> StepResult:
    """Convert columns (rules in ``libs.transformations.casting``); a row with a value that
    does not convert is rejected, its reason naming the first such column and value."""
    attributes = _attribute_columns(frame)
    missing = [c for c in step.columns if c not in attributes]
    if missing:
        raise TransformError(f"cast: column(s) {missing} do not exist; available columns: "
                             f"{attributes}")
    out = frame.copy()
    reasons: dict[int, str] = {}
    for name, target in step.columns.items():
        values = _column(frame, name)
        converted, failed = cast_array(values, target)
        for position in failed:
            reasons.setdefault(
                position,
                f"cast: {show_value(values[position].as_py())} is not {target} in column {name}")
        out[name] = pd.Series(pd.arrays.ArrowExtensionArray(converted), index=frame.index)
    reject = np.zeros(len(frame), dtype=bool)
    reject[list(reasons)] = True
    return _split(frame, reject, [reasons[p] for p in sorted(reasons)], out=out)


def normalize_column_names(frame: gpd.GeoDataFrame, step: NormalizeColumnNames,
                           target_crs: str) -> StepResult:
    """Rename every attribute column to a safe SQL identifier (rule in ``naming``)."""
    attributes = _attribute_columns(frame)
    mapping = dict(zip(attributes, normalized_names(attributes), strict=True))
    if all(old == new for old, new in mapping.items()):
        return _keep_all(frame)
    return _keep_all(frame.rename(columns=mapping))


def _hashable(values: list, arrow_type: pa.DataType) -> list:
    """Values that compare equal exactly when the data is equal (NaN equals NaN, lists become
    tuples), so rows can be keys of a dict."""
    if pa.types.is_floating(arrow_type):
        return [("NaN",) if isinstance(v, float) and math.isnan(v) else v for v in values]
    if pa.types.is_nested(arrow_type) or pa.types.is_dictionary(arrow_type):
        return [repr(v) for v in values]
    return values


def drop_duplicates(frame: gpd.GeoDataFrame, step: DropDuplicates, target_crs: str) -> StepResult:
    """Reject a row whose attributes and geometry (WKB) exactly repeat an earlier row of the
    chunk; the first occurrence is kept. ``_row_id`` is not compared. Duplicates in different
    chunks are not detected (a chunk is the unit of work)."""
    keys: list[list] = []
    for name in _attribute_columns(frame):
        values = _column(frame, name)
        keys.append(_hashable(values.to_pylist(), values.type))
    keys.append(list(shapely.to_wkb(_geometries(frame))))
    row_ids = frame[ROW_ID].to_numpy(dtype=np.int64)
    first_seen: dict[tuple, int] = {}
    reject = np.zeros(len(frame), dtype=bool)
    reasons = []
    for position, key in enumerate(zip(*keys, strict=True)):
        first = first_seen.setdefault(key, position)
        if first != position:
            reject[position] = True
            reasons.append(f"drop_duplicates: duplicate of {ROW_ID} {row_ids[first]}")
    return _split(frame, reject, reasons)


STEP_FUNCTIONS: dict[type, Callable[[gpd.GeoDataFrame, RecipeStep, str], StepResult]] = {
    Reproject: reproject,
    MakeValid: make_valid,
    DropEmpty: drop_empty,
    PromoteToMulti: promote_to_multi,
    Force2D: force_2d,
    Simplify: simplify,
    FilterBBox: filter_bbox,
    FilterAttribute: filter_attribute,
    Derive: derive,
    Rename: rename,
    Cast: cast,
    NormalizeColumnNames: normalize_column_names,
    DropDuplicates: drop_duplicates,
}


def apply_step(frame: gpd.GeoDataFrame, step: RecipeStep, target_crs: str) -> StepResult:
    """Run one recipe step on ``frame`` (which must carry ``_row_id``)."""
    return STEP_FUNCTIONS[type(step)](frame, step, target_crs)
