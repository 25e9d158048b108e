"""GeoParquet 1.1 encoding of chunks and exports (zstd, CRS as PROJJSON, bbox covering column)."""

from __future__ import annotations

import io

import geopandas as gpd
import pyarrow as pa
import pyarrow.parquet as pq

GEOMETRY = "geometry"


def to_geoparquet_bytes(frame: gpd.GeoDataFrame, row_group_rows: int = 65_536) -> bytes:
    """Encode a GeoDataFrame as GeoParquet 1.1 with a bbox covering column."""
    buffer = io.BytesIO()
    frame.to_parquet(
        buffer,
        index=False,
        compression="zstd",
        schema_version="1.1.0",
        write_covering_bbox=True,
        row_group_size=row_group_rows,
    )
    return buffer.getvalue()


def read_parquet_table(data: bytes) -> pa.Table:
    """Read GeoParquet bytes as a plain Arrow table (WKB geometry), without the covering column."""
    table = pq.read_table(pa.BufferReader(data))
    return table.drop_columns([c for c in ("bbox",) if c in table.column_names])
