"""Transform one staged chunk: decode, run the recipe, encode. No Ray, no Dagster here."""

from __future__ import annotations

from dataclasses import dataclass

from libs.errors import ReconciliationError
from libs.geoparquet import read_geoparquet_bytes, to_geoparquet_bytes
from libs.transformations.steps import make_valid, reproject


@dataclass(frozen=True)
class ChunkTransformResult:
    """What transforming one chunk produced."""

    data: bytes
    rows_in: int
    rows_out: int
    rows_rejected: int
    bbox: tuple[float, float, float, float] | None


def transform_chunk_bytes(data: bytes, target_crs: str) -> ChunkTransformResult:
    """Reproject to ``target_crs`` and repair invalid geometries; rows in = rows out + rejected."""
    frame = read_geoparquet_bytes(data)
    rows_in = len(frame)
    frame = make_valid(reproject(frame, target_crs))
    rows_out, rows_rejected = len(frame), 0
    if rows_in != rows_out + rows_rejected:
        raise ReconciliationError(
            f"chunk transform lost rows: {rows_in} in, {rows_out} out, {rows_rejected} rejected"
        )
    non_empty = frame.geometry[~(frame.geometry.is_empty | frame.geometry.isna())]
    bbox = tuple(float(v) for v in non_empty.total_bounds) if len(non_empty) else None
    return ChunkTransformResult(to_geoparquet_bytes(frame), rows_in, rows_out, rows_rejected, bbox)
