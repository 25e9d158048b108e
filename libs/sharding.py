"""Shard stage: stream a landed vector file into bounded GeoParquet chunks.

Files are read as a stream of Arrow record batches (pyogrio's Arrow reader for
GDAL formats, pyarrow for GeoParquet), so memory holds one batch plus one chunk,
never a whole file. Each chunk is encoded and handed to a ``sink`` (which writes it
to object storage) before the next one is built.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from pyogrio.errors import DataLayerError, DataSourceError
from pyogrio.raw import open_arrow
from pyproj import CRS

from libs.chunk_index import Chunk, LayerChunks
from libs.errors import InputDataError
from libs.geoparquet import GEOMETRY, to_geoparquet_bytes
from libs.manifest import DataFile, InputFormat

#: A sink stores one encoded chunk under its ordinal and returns the object key.
ChunkSink = Callable[[int, bytes], str]

_READ_BATCH_ROWS = 16_384


def _gdal_path(local_path: Path, data_file: DataFile) -> str:
    if data_file.format is InputFormat.SHAPEFILE_ZIP:
        return f"/vsizip/{local_path}"
    return str(local_path)


@contextmanager
def _open_gdal(local_path: Path, data_file: DataFile) -> Iterator[tuple[str | None, Iterator]]:
    try:
        with open_arrow(
            _gdal_path(local_path, data_file),
            layer=data_file.source_layer,
            batch_size=_READ_BATCH_ROWS,
            use_pyarrow=True,
        ) as (meta, reader):
            geometry_name = meta.get("geometry_name") or "wkb_geometry"
            yield meta.get("crs"), (_rename_geometry(b, geometry_name) for b in reader)
    except (DataSourceError, DataLayerError) as exc:
        raise InputDataError(
            f"file {data_file.path!r} (layer {data_file.layer!r}) cannot be read as "
            f"{data_file.format.value}: {exc}"
        ) from None


@contextmanager
def _open_geoparquet(local_path: Path, data_file: DataFile) -> Iterator[tuple[str | None, Iterator]]:
    try:
        parquet = pq.ParquetFile(local_path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputDataError(
            f"file {data_file.path!r} (layer {data_file.layer!r}) is not a Parquet file: {exc}"
        ) from None
    raw_geo = (parquet.schema_arrow.metadata or {}).get(b"geo")
    if raw_geo is None:
        raise InputDataError(
            f"file {data_file.path!r} is Parquet without GeoParquet 'geo' metadata; "
            "expected a GeoParquet 1.0 or 1.1 file"
        )
    geo = json.loads(raw_geo)
    primary = geo["primary_column"]
    column_meta = geo["columns"][primary]
    if column_meta.get("encoding", "WKB").upper() != "WKB":
        raise InputDataError(
            f"file {data_file.path!r}: geometry encoding {column_meta['encoding']!r} is not "
            "supported yet; expected WKB"
        )
    crs = column_meta.get("crs", "OGC:CRS84")
    crs_text = None if crs is None else (json.dumps(crs) if isinstance(crs, dict) else str(crs))
    skip = {"bbox"} if "covering" in column_meta else set()
    columns = [n for n in parquet.schema_arrow.names if n not in skip]
    batches = parquet.iter_batches(batch_size=_READ_BATCH_ROWS, columns=columns)
    yield crs_text, (_rename_geometry(b, primary) for b in batches)


def _rename_geometry(batch: pa.RecordBatch, geometry_name: str) -> pa.RecordBatch:
    names = [GEOMETRY if n == geometry_name else n for n in batch.schema.names]
    if GEOMETRY in batch.schema.names and geometry_name != GEOMETRY:
        raise InputDataError(f"an attribute column is named {GEOMETRY!r}; rename it")
    # Drop GDAL/geoarrow field metadata: the chunk's GeoParquet metadata is authoritative.
    arrays = [batch.column(i) for i in range(batch.num_columns)]
    return pa.RecordBatch.from_arrays(arrays, names=names)


def _check_declared_crs(declared: str, found: str | None, data_file: DataFile) -> None:
    if found is None:
        return
    if not CRS.from_user_input(declared).equals(CRS.from_user_input(found), ignore_axis_order=True):
        raise InputDataError(
            f"file {data_file.path!r} (layer {data_file.layer!r}) declares source_crs "
            f"{declared!r} in the manifest but the file says {CRS.from_user_input(found).name!r}; "
            "fix source_crs in the manifest or the file's CRS"
        )


def _encode_chunk(
    table: pa.Table, data_file: DataFile, first_row: int
) -> tuple[bytes, tuple[float, float, float, float] | None]:
    wkb = table.column(GEOMETRY).to_numpy(zero_copy_only=False)
    try:
        geoms = shapely.from_wkb(wkb, on_invalid="raise")
    except shapely.errors.GEOSException as exc:
        raise InputDataError(
            f"file {data_file.path!r} (layer {data_file.layer!r}), rows {first_row}-"
            f"{first_row + table.num_rows - 1}: a geometry is not valid WKB ({exc})"
        ) from None
    coords = shapely.get_coordinates(geoms)
    if coords.size and not np.isfinite(coords).all():
        bad = int(np.flatnonzero(~np.isfinite(shapely.bounds(geoms)).all(axis=1))[0])
        raise InputDataError(
            f"file {data_file.path!r} (layer {data_file.layer!r}), row {first_row + bad}: "
            "coordinates are NaN or infinite; expected finite numbers"
        )
    frame = gpd.GeoDataFrame(
        table.drop_columns([GEOMETRY]).to_pandas(),
        geometry=gpd.GeoSeries(geoms, crs=data_file.source_crs),
    )
    non_empty = geoms[~(shapely.is_empty(geoms) | shapely.is_missing(geoms))]
    bbox = None
    if len(non_empty):
        minx, miny, maxx, maxy = shapely.total_bounds(non_empty)
        bbox = (float(minx), float(miny), float(maxx), float(maxy))
    return to_geoparquet_bytes(frame), bbox


def shard_to_geoparquet(
    local_path: Path, data_file: DataFile, sink: ChunkSink, *, chunk_rows: int,
    first_ordinal: int = 0, first_row: int = 0,
) -> list[Chunk]:
    """Stream ``local_path`` into chunks of at most ``chunk_rows`` rows, each handed to ``sink``.

    ``first_ordinal``/``first_row`` continue the numbering when several files feed one layer.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    opener = _open_geoparquet if data_file.format is InputFormat.GEOPARQUET else _open_gdal
    chunks: list[Chunk] = []
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    schema: pa.Schema | None = None
    ordinal, row = first_ordinal, first_row

    def flush() -> None:
        nonlocal pending, pending_rows, ordinal, row
        table = pa.Table.from_batches(pending)
        head, rest = table.slice(0, chunk_rows), table.slice(chunk_rows)
        data, bbox = _encode_chunk(head, data_file, row)
        key = sink(ordinal, data)
        chunks.append(Chunk(key=key, layer=data_file.layer, ordinal=ordinal, row_offset=row,
                            rows=head.num_rows, bbox=bbox, crs=data_file.source_crs,
                            bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
        ordinal += 1
        row += head.num_rows
        pending = rest.to_batches()
        pending_rows = rest.num_rows

    with opener(local_path, data_file) as (found_crs, batches):
        _check_declared_crs(data_file.source_crs, found_crs, data_file)
        for batch in batches:
            if schema is None:
                schema = batch.schema
            elif not batch.schema.equals(schema):
                raise InputDataError(
                    f"file {data_file.path!r}: the columns change inside the file "
                    f"({schema} vs {batch.schema})"
                )
            if batch.num_rows:
                pending.append(batch)
                pending_rows += batch.num_rows
            while pending_rows >= chunk_rows:
                flush()
    if pending_rows:
        flush()
    if not chunks:
        raise InputDataError(
            f"file {data_file.path!r} (layer {data_file.layer!r}) has no features; "
            "expected at least one row"
        )
    return chunks


def merge_layer(layer: str, crs: str, chunks: list[Chunk]) -> LayerChunks:
    return LayerChunks(layer=layer, crs=crs, chunks=sorted(chunks, key=lambda c: c.ordinal))
