"""Transform one chunk: decode, run the recipe, encode the output and the rejects.

No Ray, no Dagster here: ``transform_chunk_bytes`` is a pure function of its arguments.

Output: GeoParquet (``libs.geoparquet.encode_frame``) in ``target_crs``, columns
``_row_id`` (int64, the chunk's ``row_offset`` + the row's position in the input chunk),
the attributes as ``plan_recipe`` predicts them, then ``geometry``. Rows keep their input
order. Attribute types survive exactly (columns are Arrow-backed in between).

Rejects: GeoParquet with one row per rejected feature, ordered by ``_row_id``:

- ``_row_id`` int64, ``_reject_step`` (the step name, e.g. ``filter``), ``_reject_reason``
  (e.g. ``filter: population >= 1000 is false``);
- ``_attributes``: the row's attributes as they were when it was rejected, as a JSON object
  (column order kept; dates and timestamps in ISO 8601, NaN as null). JSON because the
  columns change along the recipe (rename, cast, derive): one fixed schema lets every
  chunk's rejects of every layer be read together;
- ``geometry``: the ORIGINAL input geometry (WKB, NULL stays NULL) in the INPUT chunk's CRS,
  which the file's GeoParquet metadata records. Not the geometry at the moment of
  rejection: a row can be rejected before or after reprojection or repair, and the input
  geometry is the one a person can find in the source file.

Determinism: the same chunk, recipe and target CRS give byte-identical output and rejects.
The Parquet footer carries no timestamps (only the writer version and the geo
metadata), rows keep their order, and every step is deterministic.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from libs.errors import ReconciliationError, TransformError
from libs.geoparquet import encode_frame, frame_of_parts, read_geoparquet, read_wkb_parts
from libs.manifest.recipe import ROW_ID, RecipeStep, effective_recipe
from libs.transformations.arrays import transform_array_chunk
from libs.transformations.plan import parse_crs, plan_recipe
from libs.transformations.steps import add_row_ids, apply_step

BBox = tuple[float, float, float, float]

REJECT_STEP = "_reject_step"
REJECT_REASON = "_reject_reason"
REJECT_ATTRIBUTES = "_attributes"


@dataclass(frozen=True)
class ChunkTransformResult:
    """What transforming one chunk produced. rows_in = rows_out + rows_rejected."""

    data: bytes
    rejects: bytes | None  # GeoParquet, None when no row was rejected
    rows_in: int
    rows_out: int
    rows_rejected: int
    reject_reasons: dict[str, int]  # rejected rows per step name
    bbox: BBox | None  # of the output, in target_crs; None when every geometry is NULL/empty
    geometry_types: list[str]  # of the output, GeoParquet spelling ("MultiPolygon Z")
    rejects_bbox: BBox | None = field(default=None)  # of the rejects, in the input's CRS


def read_chunk(data: bytes) -> gpd.GeoDataFrame:
    """Decode a GeoParquet chunk with Arrow-backed attribute columns and no covering column."""
    return read_geoparquet(data)


def _json_value(value: object) -> object:
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return str(value)


def _finite_or_text(value: object) -> object:
    """JSON has no NaN or infinity: NaN becomes null (it means missing), infinity a string."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def _attributes_json(rows: gpd.GeoDataFrame) -> list[str]:
    attributes = pd.DataFrame(rows.drop(columns=[ROW_ID, rows.geometry.name]))
    if not len(attributes.columns):  # Arrow would see a table without columns as 0 rows
        return ["{}"] * len(rows)
    records = pa.Table.from_pandas(attributes, preserve_index=False).to_pylist()
    return [
        json.dumps({k: _finite_or_text(v) for k, v in record.items()}, ensure_ascii=False,
                   default=_json_value)
        for record in records
    ]


def _rejects_frame(parts: list[tuple[str, gpd.GeoDataFrame, list[str]]],
                   source_geoms: np.ndarray, source_crs, row_offset: int) -> gpd.GeoDataFrame:
    row_ids: list[int] = []
    steps: list[str] = []
    reasons: list[str] = []
    attributes: list[str] = []
    for step_name, rows, why in parts:
        row_ids.extend(int(i) for i in rows[ROW_ID])
        steps.extend([step_name] * len(rows))
        reasons.extend(why)
        attributes.extend(_attributes_json(rows))
    order = np.argsort(np.asarray(row_ids, dtype=np.int64), kind="stable")
    ids = np.asarray(row_ids, dtype=np.int64)[order]

    def text(values: list[str]) -> pd.arrays.ArrowExtensionArray:
        return pd.arrays.ArrowExtensionArray(pa.array([values[i] for i in order], pa.string()))

    table = {
        ROW_ID: pd.arrays.ArrowExtensionArray(pa.array(ids, pa.int64())),
        REJECT_STEP: text(steps),
        REJECT_REASON: text(reasons),
        REJECT_ATTRIBUTES: text(attributes),
    }
    geometry = gpd.GeoSeries(source_geoms[ids - row_offset], crs=source_crs)
    return gpd.GeoDataFrame(table, geometry=geometry)


def _reconcile(rows_in: int, row_offset: int, output: gpd.GeoDataFrame,
               parts: list[tuple[str, gpd.GeoDataFrame, list[str]]]) -> None:
    rows_out = len(output)
    rows_rejected = sum(len(rows) for _, rows, _ in parts)
    if rows_in != rows_out + rows_rejected:
        raise ReconciliationError(
            f"chunk transform does not add up: {rows_in} rows in, {rows_out} out, "
            f"{rows_rejected} rejected")
    seen = np.concatenate([output[ROW_ID].to_numpy(dtype=np.int64)]
                          + [rows[ROW_ID].to_numpy(dtype=np.int64) for _, rows, _ in parts])
    if not np.array_equal(np.sort(seen), np.arange(row_offset, row_offset + rows_in)):
        raise ReconciliationError(
            f"chunk transform lost or repeated rows: the {ROW_ID}s out and rejected are not "
            f"{row_offset}..{row_offset + rows_in - 1} exactly once")


def transform_chunk_bytes(data: bytes, steps: Sequence[RecipeStep], target_crs: str,
                          row_offset: int) -> ChunkTransformResult:
    """Run ``effective_recipe(steps)`` on the GeoParquet chunk ``data``.

    Raises TransformError (naming the step, and for a ``fail`` policy the ``_row_id`` and
    the reason) when a step cannot run, ReconciliationError when rows do not add up.
    """
    steps = effective_recipe(steps)
    planned = plan_recipe(steps, pq.read_schema(pa.BufferReader(data)), target_crs)
    # decoded once, for the coordinate-array path and, when it steps aside, the general one
    parts = read_wkb_parts(data)
    arrays = None if parts is None else transform_array_chunk(parts, steps, target_crs,
                                                              row_offset, planned)
    if arrays is not None:
        encoded, bbox, rows, types = arrays
        return ChunkTransformResult(data=encoded, rejects=None, rows_in=rows, rows_out=rows,
                                    rows_rejected=0, reject_reasons={}, bbox=bbox,
                                    geometry_types=types, rejects_bbox=None)
    frame = add_row_ids(read_chunk(data) if parts is None else frame_of_parts(parts), row_offset)
    rows_in = len(frame)
    source_geoms = np.asarray(frame.geometry.values, dtype=object)
    source_crs = frame.crs
    parts: list[tuple[str, gpd.GeoDataFrame, list[str]]] = []
    for index, step in enumerate(steps):
        try:
            result = apply_step(frame, step, target_crs)
        except TransformError as exc:
            raise TransformError(f"recipe step {index}: {exc}") from None
        frame = result.frame
        if len(result.rejected):
            parts.append((step.step, result.rejected, result.reasons))
    _reconcile(rows_in, row_offset, frame, parts)
    target = parse_crs(target_crs, "target_crs")
    if frame.crs is None or not frame.crs.equals(target):
        raise TransformError(f"the recipe left the chunk in {frame.crs!r}, not in {target_crs!r}")
    if sorted(frame.columns) != sorted(planned.names):
        # the plan and the steps disagree: a bug here, never a reason to drop a column quietly
        raise TransformError(f"the recipe produced columns {list(frame.columns)} but the plan "
                             f"said {planned.names}")
    output = frame[planned.names].reset_index(drop=True)
    reasons: Counter[str] = Counter()
    for step_name, rows, _ in parts:
        reasons[step_name] += len(rows)
    rejects = rejects_bbox = None
    if parts:
        rejects, rejects_bbox, _ = encode_frame(
            _rejects_frame(parts, source_geoms, source_crs, row_offset))
    data, bbox, types = encode_frame(output)
    return ChunkTransformResult(
        data=data,
        rejects=rejects,
        rows_in=rows_in,
        rows_out=len(output),
        rows_rejected=sum(reasons.values()),
        reject_reasons=dict(reasons),
        bbox=bbox,
        geometry_types=types,
        rejects_bbox=rejects_bbox,
    )
