"""Shard stage: any landed vector dataset -> spatially ordered, bounded GeoParquet chunks.

What this module owns
---------------------
* Reading every input format of the manifest as a stream of Arrow record batches: GDAL
  formats through pyogrio's Arrow reader (``pyogrio.raw.open_arrow``), GeoParquet 1.0/1.1
  through ``pyarrow.parquet.ParquetFile.iter_batches``. No file is ever loaded whole.
* Checking what was landed before trusting it: zip archives (member names, inflated size,
  compression ratio) from the central directory before GDAL touches them, the driver GDAL
  detects against the declared format, CRS (manifest vs file, and across a layer's files),
  text encodings, coordinates, geometry families and column agreement. Every problem is an
  :class:`~libs.errors.InputDataError` naming the file, the layer and what was expected.
  Input files are only read, never written.
* Ordering a whole layer (all files feeding it) along a Hilbert curve and cutting it into
  GeoParquet 1.1 chunks bounded by rows and bytes, so each chunk covers a compact area.

Algorithm
---------
The sort key of a row is the Hilbert index (2^32 cells per axis, a 64-bit key, computed
with 8-bit lookup tables in numpy) of the centre of its geometry's bbox, normalised to the
layer's extent of centres with one scale for both axes. Every sort is stable and rows enter
it in source order (file by file, row by row), so ties keep source order, rows without a
geometry come last, and the output is deterministic.

1. Read: stream each source in ``read_batch_rows`` batches (GDAL decodes the next batch on
   a helper thread meanwhile); bboxes come straight from point WKB (strided numpy views, no
   parsing) or from shapely otherwise; rows are validated; bounds and a geometry-type code
   are added as columns; the extent and a fixed-size random sample of centres are tracked.
   A layer that fits in half of ``sort_memory_bytes`` stays in memory; a larger one (or one
   whose files are already larger) goes to per-source Arrow IPC files in ``scratch_dir``.
2. In memory: compute keys, ``argsort`` them, cut chunks by gathering rows. External:
   stream the spill files once more, compute keys and range-partition the rows into K
   bucket files, at key boundaries taken from quantiles of the sampled keys (so clustered
   data still gives even buckets), with K such that a bucket is ~1/8 of the budget (<= 256).
3. Load one bucket at a time, sort it and cut chunks, carrying the unfinished chunk over to
   the next bucket so chunk boundaries do not depend on K (the external sort gives the same
   bytes as the in-memory one). A bucket over half the budget (skewed or duplicated keys) is
   re-partitioned on its own key quantiles, recursively; a bucket whose rows all share one
   key is already in order and is streamed straight out.

Chunks are cut where either ``chunk_rows`` or ``chunk_bytes`` (estimated from the Arrow
size of the rows, which zstd Parquet does not exceed in practice) would be exceeded; a
chunk whose encoding still exceeds ``chunk_bytes`` is split in half. Chunks are written
with pyarrow directly (zstd, ``geo`` metadata with the CRS as PROJJSON, geometry_types and
bbox, a ``bbox`` covering column of float32 rounded outwards, with statistics);
``encode_threads`` threads gather and
encode chunks while the next one is cut; ``sink`` is called from the calling thread, in order.

Memory (measured in ``benchmarks/README.md``): the interpreter and libraries, plus at most
half of ``sort_memory_bytes`` of rows (the in-memory layer, or about a quarter of that for
the bucket being sorted), plus ``encode_threads`` chunks being gathered and encoded, plus
two read batches. None of it grows with the input, which only sets the number of buckets
and the scratch disk used (about the input's Arrow size, twice while partitioning).

Why not dask-geopandas
----------------------
dask-geopandas is in the stack, and was considered for the ordering: its
``spatial_shuffle`` is ``set_index`` on ``hilbert_distance``. It does not fit here:
``hilbert_distance`` works at level <= 16 and refuses empty or missing geometries; the
distances are computed eagerly to find divisions (a full extra read); on the local
scheduler the shuffle holds every partition in memory (spilling to disk needs
``dask.distributed`` workers, a second cluster beside Ray inside the run worker); and
``dask_geopandas.read_file`` partitions with ``skip_features``, which re-scans from the
start for drivers without random access (GeoJSON, CSV, zipped Shapefiles). An external
sort over Arrow IPC files needs no scheduler, reads the input once, and keeps memory flat.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
import shutil
import tempfile
import threading
import unicodedata
import warnings
import zipfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from queue import Full, Queue

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pyogrio
import shapely
from pyogrio.errors import (
    CRSError,
    DataLayerError,
    DataSourceError,
    FeatureError,
    FieldError,
    GeometryError,
)
from pyogrio.raw import open_arrow
from pyproj import CRS

from libs.chunk_index import BBox, Chunk, LayerChunks
from libs.errors import InputDataError, ReconciliationError
from libs.geoparquet import GEOMETRY
from libs.manifest import DataFile, InputFormat

__all__ = [
    "ChunkSink",
    "LayerSource",
    "ShardLimits",
    "ShardedLayer",
    "hilbert_index",
    "normalised_layer_name",
    "plan_layers",
    "shard_layer",
]

#: A sink stores one encoded chunk under its ordinal and returns the object key.
ChunkSink = Callable[[int, bytes], str]

#: The GeoParquet covering column written next to the geometry.
COVERING = "bbox"
_COVERING_FIELDS = ("xmin", "ymin", "xmax", "ymax")

_GDAL_ERRORS = (DataSourceError, DataLayerError, CRSError, FeatureError, FieldError, GeometryError,
                RuntimeError, ValueError, IndexError)
_DRIVERS = {
    InputFormat.GEOJSON: "GeoJSON",
    InputFormat.GEOJSONSEQ: "GeoJSONSeq",
    InputFormat.GPKG: "GPKG",
    InputFormat.FLATGEOBUF: "FlatGeobuf",
    InputFormat.SHAPEFILE_ZIP: "ESRI Shapefile",
    InputFormat.CSV: "CSV",
}
_TEXT_FORMATS = {InputFormat.CSV, InputFormat.GEOJSON, InputFormat.GEOJSONSEQ}

# Internal columns carried through the sort; never written to a chunk.
_MINX, _MINY, _MAXX, _MAXY = "__shard_minx", "__shard_miny", "__shard_maxx", "__shard_maxy"
_TYPE, _KEY = "__shard_type", "__shard_key"  # WKB type * 2 + has Z; Hilbert key
_BOUNDS = (_MINX, _MINY, _MAXX, _MAXY)
_RESERVED = {GEOMETRY, COVERING}

_SAMPLE_SIZE = 65_536
_MAX_BUCKETS = 256
_BUCKET_FLUSH_ROWS = 16_384
_EMPTY_KEY = np.uint64(2**64 - 1)
_PARSE_BYTES = 32 * 2**20


# --------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardLimits:
    """Bounds of the shard stage; the defaults suit a 2-core worker with 2-8 GiB.

    * ``chunk_rows`` (100k-1M) and ``chunk_bytes`` (32-512 MiB) bound every chunk: rows, and
      encoded bytes (a single row larger than ``chunk_bytes`` still makes a chunk).
    * ``read_batch_rows`` (16k-256k): rows per streamed batch.
    * ``max_zip_bytes`` / ``max_zip_ratio``: what a zip may inflate to, in total and as a
      multiple of the archive's size; checked before GDAL opens it.
    * ``sort_memory_bytes`` (128 MiB-2 GiB): memory for sorting. A layer up to half of it is
      sorted in memory; a larger one externally, in buckets of about 1/8 of it.
    * ``encode_threads`` (1-cores): chunks gathered and encoded in parallel.
    """

    chunk_rows: int = 250_000
    chunk_bytes: int = 128 * 2**20
    read_batch_rows: int = 65_536
    max_zip_bytes: int = 20 * 2**30
    max_zip_ratio: float = 100.0
    sort_memory_bytes: int = 256 * 2**20
    encode_threads: int = 2

    def __post_init__(self) -> None:
        for name in ("chunk_rows", "chunk_bytes", "read_batch_rows", "max_zip_bytes",
                     "sort_memory_bytes", "encode_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"ShardLimits.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_zip_ratio <= 0:
            raise ValueError(f"ShardLimits.max_zip_ratio must be > 0, got {self.max_zip_ratio}")


@dataclass(frozen=True)
class _Probe:
    """What a first look at a source found (driver, CRS, how to open it)."""

    gdal_path: str | None  # None: read with pyarrow (GeoParquet)
    gdal_layer: str | None
    crs: str | None  # the file's own CRS as text pyproj reads, None when it declares none
    encoding_note: str  # what decides the text encoding, for error messages
    open_options: tuple[tuple[str, str], ...] = ()


@dataclass
class LayerSource:
    """One file (or one layer of a multi-layer file) feeding a manifest layer."""

    path: Path
    data_file: DataFile
    source_layer: str | None
    probe: _Probe | None = field(default=None, repr=False, compare=False)


@dataclass
class ShardedLayer:
    """What sharding a layer produced: the chunk list handed to the next op, and facts."""

    chunks: LayerChunks
    schema: pa.Schema  # attribute columns + geometry (WKB)
    geometry_types: list[str]
    rows_per_source: dict[str, int]  # str(path) -> rows

    @property
    def layer(self) -> str:
        return self.chunks.layer

    @property
    def rows(self) -> int:
        return self.chunks.rows


# --------------------------------------------------------------------------------------
# Planning: zip safety, format detection, layer expansion
# --------------------------------------------------------------------------------------


def _where(data_file: DataFile, layer: str | None = None, source_layer: str | None = None) -> str:
    """How messages name a source: ``file 'a.gpkg' (source layer 'roads', layer 'base_roads')``."""
    inner = f"source layer {source_layer!r}, " if source_layer else ""
    return f"file {data_file.path!r} ({inner}layer {layer or data_file.layer!r})"


def normalised_layer_name(name: str) -> str:
    """A source layer name as an identifier: ``[a-z0-9_]``, lower case, no leading digit."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    cleaned = re.sub(r"[^a-z0-9]+", "_", ascii_name.lower()).strip("_")
    if cleaned[:1].isdigit():
        cleaned = f"_{cleaned}"
    return cleaned


def _expanded_layer_name(layer: str, source_layer: str, data_file: DataFile) -> str:
    suffix = normalised_layer_name(source_layer)
    if not suffix:
        raise InputDataError(
            f"file {data_file.path!r}: source layer {source_layer!r} has no letters or digits to "
            f"name layer '{layer}_…' after; rename it in the file or list it with source_layer"
        )
    return f"{layer}_{suffix}".encode()[:63].decode("ascii")


def _sniff(path: Path) -> str:
    """A guess at what a file is from its first bytes, for error messages."""
    try:
        with path.open("rb") as handle:
            head = handle.read(64)
    except OSError:
        return "unreadable"
    if not head:
        return "an empty file"
    for magic, what in ((b"PAR1", "a Parquet file"), (b"PK\x03\x04", "a zip archive"),
                        (b"SQLite format 3", "an SQLite/GeoPackage database"),
                        (b"fgb\x03", "a FlatGeobuf file")):
        if head.startswith(magic):
            return what
    text = head.lstrip(b"\xef\xbb\xbf\x1e \t\r\n")
    if text[:1] in (b"{", b"["):
        return "JSON text"
    return "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head[:32]) else "binary data"


def _check_zip(path: Path, data_file: DataFile, limits: ShardLimits) -> list[str]:
    """Validate an archive from its central directory; return its member names."""
    where = _where(data_file)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except zipfile.BadZipFile:
        raise InputDataError(
            f"{where}: declared shapefile_zip but it is not a zip archive (it looks like "
            f"{_sniff(path)}); expected a .zip holding .shp, .shx, .dbf and .prj"
        ) from None
    total = 0
    for member in members:
        name = member.filename
        parts = re.split(r"[\\/]", name)
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
            raise InputDataError(
                f"{where}: zip member {name!r} has an absolute or '..' path; expected paths "
                "inside the archive (re-create the zip from the shapefile's folder)"
            )
        if member.flag_bits & 0x1:
            raise InputDataError(f"{where}: zip member {name!r} is encrypted; expected a plain zip")
        total += member.file_size
    if total > limits.max_zip_bytes:
        raise InputDataError(
            f"{where}: the zip inflates to {total:,} bytes, over the limit of "
            f"{limits.max_zip_bytes:,} (ShardLimits.max_zip_bytes); split the data into "
            "several files or raise the limit"
        )
    ratio = total / max(path.stat().st_size, 1)
    if ratio > limits.max_zip_ratio:
        raise InputDataError(
            f"{where}: the zip inflates {ratio:.0f}x its size ({total:,} bytes), over the limit "
            f"of {limits.max_zip_ratio:g}x (ShardLimits.max_zip_ratio); a zip bomb is refused — "
            "if the data really compresses that well, raise the limit"
        )
    return [m.filename for m in members if not m.is_dir()]


def _shapefiles_in_zip(members: list[str]) -> dict[str, str]:
    """Shapefile stem -> .shp member path, ignoring macOS resource forks."""
    found = {}
    for name in members:
        pure = PurePosixPath(name.replace("\\", "/"))
        if "__MACOSX" in pure.parts or pure.name.startswith("._"):
            continue
        if pure.suffix.lower() == ".shp":
            found[pure.stem] = str(pure)
    return found


def _zip_sidecar(members: list[str], shp: str, suffix: str) -> str | None:
    stem = str(PurePosixPath(shp).with_suffix("")).lower()
    for name in members:
        pure = PurePosixPath(name.replace("\\", "/"))
        if str(pure.with_suffix("")).lower() == stem and pure.suffix.lower() == suffix:
            return name
    return None


def _read_info(gdal_path: str, layer: str | None, **options: str) -> dict:
    with warnings.catch_warnings():
        # e.g. "Measured (M) geometry types are not supported": the data is checked later.
        warnings.simplefilter("ignore")
        return pyogrio.read_info(gdal_path, layer=layer, **options)


def _detect_driver(gdal_path: str, path: Path, data_file: DataFile, layer: str | None) -> dict:
    """read_info of a GDAL source, with its driver checked against the declared format."""
    where = _where(data_file, source_layer=layer)
    expected = _DRIVERS[data_file.format]
    try:
        info = _read_info(gdal_path, layer)
    except DataLayerError as exc:
        raise InputDataError(f"{where}: {exc}; expected an existing layer "
                             f"(available: {_list_layers(gdal_path)})") from None
    except _GDAL_ERRORS as exc:
        if data_file.format is InputFormat.CSV and "not recognized" in str(exc):
            return {}  # GDAL recognises CSV by extension only; it is opened as "CSV:<path>"
        raise InputDataError(
            f"{where} cannot be read as {data_file.format.value}: GDAL says {exc} (the file looks "
            f"like {_sniff(path)}); expected a valid {expected} file"
        ) from None
    driver = info.get("driver")
    if driver != expected and not (
        data_file.format is InputFormat.GEOJSONSEQ and driver == "GeoJSON"
        and 0 <= info.get("features", -1) <= 1  # a one-feature sequence is also GeoJSON
    ):
        raise InputDataError(
            f"{where}: declared {data_file.format.value} but GDAL reads it as {driver}; fix "
            f"'format' in the manifest or land the right file"
        )
    return info


def _list_layers(gdal_path: str) -> list[str]:
    try:
        return [str(name) for name in pyogrio.list_layers(gdal_path)[:, 0]]
    except _GDAL_ERRORS:
        return []


def _parquet_file(path: Path, data_file: DataFile) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except (pa.ArrowInvalid, OSError) as exc:
        try:
            driver = pyogrio.read_info(str(path))["driver"]
            seen = f"GDAL reads it as {driver}"
        except _GDAL_ERRORS:
            seen = f"it looks like {_sniff(path)}"
        raise InputDataError(
            f"{_where(data_file)}: declared geoparquet but it is not a Parquet file ({seen}; "
            f"pyarrow says {exc}); expected a GeoParquet 1.0 or 1.1 file"
        ) from None


def _geo_metadata(parquet: pq.ParquetFile, data_file: DataFile) -> dict:
    raw = (parquet.schema_arrow.metadata or {}).get(b"geo")
    where = _where(data_file)
    if raw is None:
        raise InputDataError(
            f"{where} is Parquet without GeoParquet 'geo' metadata; expected a GeoParquet 1.0 "
            "or 1.1 file (write it with geopandas.to_parquet or GDAL's Parquet driver)"
        )
    try:
        geo = json.loads(raw)
        primary = geo["primary_column"]
        column = geo["columns"][primary]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputDataError(f"{where}: the GeoParquet 'geo' metadata is malformed ({exc!r})") from None
    encoding = str(column.get("encoding", "WKB"))
    if encoding.upper() != "WKB":
        raise InputDataError(
            f"{where}: geometry column {primary!r} uses GeoParquet encoding {encoding!r}; "
            "expected 'WKB' (re-write the file with WKB geometry)"
        )
    if primary not in parquet.schema_arrow.names:
        raise InputDataError(f"{where}: the 'geo' metadata names geometry column {primary!r}, "
                             "which the file does not have")
    return geo


def _geoparquet_crs(geo: dict) -> str | None:
    column = geo["columns"][geo["primary_column"]]
    if "crs" not in column:
        return "OGC:CRS84"  # GeoParquet: an absent crs means OGC:CRS84
    crs = column["crs"]
    if crs is None:
        return None  # explicitly unknown
    return json.dumps(crs) if isinstance(crs, dict) else str(crs)


def _probe(path: Path, data_file: DataFile, source_layer: str | None,
           limits: ShardLimits) -> _Probe:
    """Check a source is what the manifest says and find how to open it (no data is read)."""
    where = _where(data_file, source_layer=source_layer)
    fmt = data_file.format
    if not path.is_file():
        raise InputDataError(f"{where}: no such file {str(path)!r}")
    if data_file.encoding and fmt not in _TEXT_FORMATS | {InputFormat.SHAPEFILE_ZIP}:
        if codecs.lookup(data_file.encoding).name != "utf-8":
            raise InputDataError(
                f"{where}: declares encoding {data_file.encoding!r}, but {fmt.value} stores text "
                "as UTF-8 by definition; remove 'encoding' from the manifest"
            )
    if fmt is InputFormat.GEOPARQUET:
        if source_layer is not None:
            raise InputDataError(f"{where}: a GeoParquet file has one layer; remove source_layer")
        geo = _geo_metadata(_parquet_file(path, data_file), data_file)
        return _Probe(None, None, _geoparquet_crs(geo), "UTF-8 (Parquet)")
    gdal_path, encoding_note, options = str(path), "UTF-8", ()
    layer = source_layer
    if fmt is InputFormat.SHAPEFILE_ZIP:
        members = _check_zip(path, data_file, limits)
        shapefiles = _shapefiles_in_zip(members)
        if not shapefiles:
            raise InputDataError(f"{where}: the zip holds no .shp file (members: {members[:10]}); "
                                 "expected a zipped Shapefile")
        if source_layer is None and len(shapefiles) > 1:
            raise InputDataError(f"{where}: the zip holds several shapefiles {sorted(shapefiles)}; "
                                 "name one with source_layer, or set all_layers")
        stem = source_layer if source_layer is not None else next(iter(shapefiles))
        if stem not in shapefiles:
            raise InputDataError(f"{where}: the zip has no shapefile {stem!r}; "
                                 f"available: {sorted(shapefiles)}")
        shp = shapefiles[stem]
        for suffix in (".shx", ".dbf"):
            if _zip_sidecar(members, shp, suffix) is None:
                raise InputDataError(
                    f"{where}: the zip has {shp!r} but no {suffix} file next to it; a Shapefile "
                    "needs .shp, .shx and .dbf (and .prj for its CRS): zip all of them"
                )
        gdal_path, layer = f"/vsizip/{path.resolve()}/{shp}", None
        cpg = _zip_sidecar(members, shp, ".cpg")
        if data_file.encoding:
            encoding_note = f"{data_file.encoding} (declared in the manifest)"
        elif cpg is not None:
            with zipfile.ZipFile(path) as archive:
                declared = archive.read(cpg)[:64].decode("ascii", "replace").strip()
            encoding_note = f"{declared} (declared by {PurePosixPath(cpg).name})"
        else:
            encoding_note = "UTF-8 (no .cpg and no encoding in the manifest)"
    elif data_file.encoding:
        encoding_note = f"{data_file.encoding} (declared in the manifest)"
    info = _detect_driver(gdal_path, path, data_file, layer)
    if fmt is InputFormat.CSV:
        gdal_path = f"CSV:{path}"
        options = _csv_options(data_file, where, _read_info(gdal_path, None))
        info = _read_info(gdal_path, None, **dict(options))
    elif layer is None and fmt is not InputFormat.SHAPEFILE_ZIP:
        layers = _list_layers(gdal_path)
        layer = layers[0] if layers else None
    if info.get("geometry_type") is None and fmt is not InputFormat.CSV:
        raise InputDataError(f"{where}: the layer has no geometry column; expected spatial data")
    return _Probe(gdal_path, layer, info.get("crs"), encoding_note, options)


def _csv_options(data_file: DataFile, where: str, info: dict) -> tuple[tuple[str, str], ...]:
    spec = data_file.csv
    assert spec is not None  # the manifest model requires it for csv
    columns = [str(c) for c in info.get("fields", [])]
    wanted = [spec.wkt_column] if spec.wkt_column else [spec.x_column, spec.y_column]
    for name in wanted:
        if name not in columns:
            raise InputDataError(f"{where}: the CSV has no column {name!r}; its columns are "
                                 f"{columns} (check csv.* in the manifest, names are exact)")
    if spec.wkt_column:
        return (("GEOM_POSSIBLE_NAMES", spec.wkt_column), ("KEEP_GEOM_COLUMNS", "YES"))
    if any(c.upper() == "WKT" for c in columns):
        raise InputDataError(
            f"{where}: the CSV has a column named 'WKT', which GDAL always reads as the geometry, "
            "but the manifest declares x/y columns; declare csv.wkt_column or rename the column"
        )
    return (("X_POSSIBLE_NAMES", spec.x_column), ("Y_POSSIBLE_NAMES", spec.y_column),
            ("KEEP_GEOM_COLUMNS", "YES"))


def _source_layers(path: Path, data_file: DataFile, limits: ShardLimits) -> list[str]:
    """Every spatial layer of a multi-layer file (for ``all_layers``)."""
    if data_file.format is InputFormat.GEOPARQUET:
        return [path.stem]
    if data_file.format is InputFormat.SHAPEFILE_ZIP:
        return list(_shapefiles_in_zip(_check_zip(path, data_file, limits)))
    try:
        listing = pyogrio.list_layers(str(path))
    except _GDAL_ERRORS as exc:
        raise InputDataError(f"{_where(data_file)} cannot be read as {data_file.format.value}: "
                             f"GDAL says {exc} (the file looks like {_sniff(path)})") from None
    return [str(name) for name, geometry_type in listing if geometry_type is not None]


def plan_layers(files: list[tuple[Path, DataFile]],
                limits: ShardLimits | None = None) -> dict[str, list[LayerSource]]:
    """Group landed files by the layer they feed, checking every file before any is sharded.

    ``all_layers`` files feed one layer per spatial source layer, named
    ``<layer>_<normalised source layer name>``; layer order is first appearance. Checked here,
    without reading features: zip safety, the driver GDAL detects against the declared format,
    that named layers and CSV columns exist, and each layer's CRS.
    """
    limits = limits or ShardLimits()
    plan: dict[str, list[LayerSource]] = {}
    for path, data_file in files:
        if not data_file.all_layers:
            probe = _probe(path, data_file, data_file.source_layer, limits)
            plan.setdefault(data_file.layer, []).append(
                LayerSource(path, data_file, data_file.source_layer, probe))
            continue
        names = _source_layers(path, data_file, limits)
        if not names:
            raise InputDataError(f"{_where(data_file)} has no spatial layers; expected at least "
                                 "one layer with a geometry column")
        produced: dict[str, str] = {}
        for name in names:
            layer = _expanded_layer_name(data_file.layer, name, data_file)
            if layer in produced:
                raise InputDataError(
                    f"{_where(data_file)}: source layers {produced[layer]!r} and {name!r} both "
                    f"become layer {layer!r}; rename one of them in the file"
                )
            produced[layer] = name
            source_layer = None if data_file.format is InputFormat.GEOPARQUET else name
            probe = _probe(path, data_file, source_layer, limits)
            plan.setdefault(layer, []).append(LayerSource(path, data_file, source_layer, probe))
    for layer, sources in plan.items():
        _layer_crs(layer, sources, [s.probe for s in sources])
    return plan


# --------------------------------------------------------------------------------------
# CRS
# --------------------------------------------------------------------------------------


def _crs(text: str) -> CRS:
    return CRS.from_user_input(json.loads(text) if text.lstrip().startswith("{") else text)


def _crs_label(crs: CRS) -> str:
    authority = crs.to_authority(min_confidence=90)
    return f"{crs.name} ({':'.join(authority)})" if authority else repr(crs.name)


def _same_crs(a: CRS, b: CRS) -> bool:
    if a.equals(b, ignore_axis_order=True):
        return True
    found_a, found_b = a.to_authority(min_confidence=90), b.to_authority(min_confidence=90)
    return found_a is not None and found_a == found_b


def _crs_text(crs: CRS) -> str:
    authority = crs.to_authority(min_confidence=90)
    return ":".join(authority) if authority else crs.to_wkt()


def _layer_crs(layer: str, sources: list[LayerSource], probes: list[_Probe]) -> CRS:
    """The one CRS all sources of a layer share (each checked against the manifest)."""
    crs, first = None, sources[0]
    for source, probe in zip(sources, probes, strict=True):
        found = _effective_crs(source, probe, layer)
        if crs is None:
            crs, first = found, source
        elif not _same_crs(crs, found):
            raise InputDataError(
                f"layer {layer!r}: file {first.data_file.path!r} is in {_crs_label(crs)} but file "
                f"{source.data_file.path!r} is in {_crs_label(found)}; expected one CRS per layer "
                "— reproject one of the files, or feed them to different layers"
            )
    assert crs is not None
    return crs


def _effective_crs(source: LayerSource, probe: _Probe, layer: str) -> CRS:
    where = _where(source.data_file, layer, source.source_layer)
    declared = source.data_file.source_crs
    found = _crs(probe.crs) if probe.crs else None
    if declared is not None:
        wanted = CRS.from_user_input(declared)
        if found is not None and not _same_crs(wanted, found):
            raise InputDataError(
                f"{where}: the manifest declares source_crs {declared!r} ({_crs_label(wanted)}) "
                f"but the file's CRS is {_crs_label(found)}; fix source_crs in the manifest, or "
                "remove it to use the file's own CRS"
            )
        return wanted
    if found is not None:
        return found
    hint = {InputFormat.SHAPEFILE_ZIP: " (a Shapefile without .prj?)",
            InputFormat.CSV: " (a CSV file never does)"}.get(source.data_file.format, "")
    raise InputDataError(
        f"{where} declares no CRS{hint} and the manifest gives no source_crs; add source_crs "
        "to the file's entry, e.g. \"source_crs\": \"EPSG:4326\""
    )


# --------------------------------------------------------------------------------------
# Reading sources as normalised Arrow batches
# --------------------------------------------------------------------------------------


def _plain_type(data_type: pa.DataType) -> pa.DataType:
    """The storage type we keep: no extension, dictionary or large variants."""
    if isinstance(data_type, pa.ExtensionType):
        data_type = data_type.storage_type
    if pa.types.is_dictionary(data_type):
        data_type = data_type.value_type
    if pa.types.is_large_string(data_type) or pa.types.is_string_view(data_type):
        return pa.string()
    if pa.types.is_large_binary(data_type) or pa.types.is_binary_view(data_type):
        return pa.binary()
    return data_type


class _Normaliser:
    """Turns a reader's batches into ``attributes + geometry`` with plain types."""

    def __init__(self, schema: pa.Schema, geometry_name: str, where: str,
                 drop: tuple[str, ...] = ()):
        fields, self.sources = [], []
        for index, item in enumerate(schema):
            if item.name == geometry_name:
                continue
            if item.name in drop:
                continue
            if item.name in _RESERVED or item.name.startswith("__shard_"):
                raise InputDataError(
                    f"{where}: has an attribute column named {item.name!r}, which chunks use for "
                    "the geometry or its bbox; rename the column in the file"
                )
            fields.append(pa.field(item.name, _plain_type(item.type)))
            self.sources.append(index)
        if geometry_name not in schema.names:
            raise InputDataError(f"{where}: no geometry column {geometry_name!r} in the data")
        self.geometry_index = schema.get_field_index(geometry_name)
        self.schema = pa.schema([*fields, pa.field(GEOMETRY, pa.binary())])

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        arrays = []
        for index, target in zip([*self.sources, self.geometry_index], self.schema.types,
                                 strict=True):
            array = batch.column(index)
            if isinstance(array, pa.ExtensionArray):
                array = array.storage
            if array.type != target:
                array = array.cast(target)
            arrays.append(array)
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)


def _gdal_encoding(name: str) -> str:
    """A Python codec name as the iconv name GDAL expects (it is picky about spelling)."""
    canonical = codecs.lookup(name).name
    return {"utf-8": "UTF-8", "iso8859-1": "ISO-8859-1", "ascii": "ASCII"}.get(
        canonical, canonical.upper())


def _transcode_to_utf8(path: Path, encoding: str, out: Path, where: str) -> Path:
    """Copy a text file as UTF-8 (GDAL's Arrow reader only reads UTF-8 for text formats)."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    consumed, lines = 0, 1
    with path.open("rb") as source, out.open("w", encoding="utf-8", newline="") as target:
        while block := source.read(1 << 20):
            try:
                text = decoder.decode(block)
            except UnicodeDecodeError as exc:
                line = lines + block[: exc.start].count(b"\n")
                raise InputDataError(
                    f"{where}: byte {consumed + exc.start:,} (line {line}) cannot be decoded as the "
                    f"declared encoding {encoding!r} ({exc.reason}); declare the file's real "
                    "encoding in the manifest (e.g. 'cp1252', 'utf-8')"
                ) from None
            consumed += len(block)
            lines += block.count(b"\n")
            target.write(text)
        target.write(decoder.decode(b"", final=True))
    return out


def _check_utf8(batch: pa.RecordBatch, first_row: int, where: str, encoding_note: str) -> None:
    for item, column in zip(batch.schema, batch.columns, strict=True):
        if not pa.types.is_string(item.type):
            continue
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            values = column.cast(pa.binary()).to_pylist()
            row = next(i for i, v in enumerate(values) if v is not None and not _is_utf8(v))
            raise InputDataError(
                f"{where}, row {first_row + row}, column {item.name!r}: text "
                f"{values[row][:40]!r} is not valid in encoding {encoding_note}; set 'encoding' "
                "in the manifest to the file's real encoding (e.g. 'cp1252' or 'latin-1')"
            ) from None


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_CSV_BAD_VALUE = re.compile(r"Invalid value type found in record (\d+) for field (.+?)\.")


class _CsvGeometryCheck:
    """GDAL's CSV reader turns unreadable WKT or x/y into a NULL geometry: make that an error."""

    def __init__(self, data_file: DataFile, where: str):
        spec = data_file.csv
        assert spec is not None
        self.where = where
        self.wkt = spec.wkt_column
        self.xy = (spec.x_column, spec.y_column) if spec.x_column else None
        self.columns = (self.wkt,) if self.wkt else self.xy

    def __call__(self, batch: pa.RecordBatch, geometry_name: str, first_row: int,
                 caught: list[warnings.WarningMessage]) -> None:
        for message in caught:
            match = _CSV_BAD_VALUE.search(str(message.message))
            if match:
                raise InputDataError(
                    f"{self.where}, row {int(match.group(1)) - 1}: column {match.group(2)!r} is not "
                    "a number; expected numeric x/y coordinates (or both empty for no geometry)"
                )
        geometry_missing = batch.column(geometry_name).is_null()
        if self.wkt:
            text = batch.column(self.wkt)
            given = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0)
            bad = pc.and_(geometry_missing, pc.fill_null(given, False))
            if pc.any(bad).as_py():
                row = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
                raise InputDataError(
                    f"{self.where}, row {first_row + row}: column {self.wkt!r} holds "
                    f"{text[row].as_py()[:60]!r}, which is not valid WKT; expected e.g. "
                    "'POINT (1 2)' (or an empty value for no geometry)"
                )
            return
        x_column, y_column = batch.column(self.xy[0]), batch.column(self.xy[1])
        x = x_column.to_numpy(zero_copy_only=False).astype(float)
        y = y_column.to_numpy(zero_copy_only=False).astype(float)
        # Empty fields are NULL (no geometry, fine when both are); GDAL reads 'nan' or '1e999'
        # as non-finite numbers and silently drops the geometry, so those are errors here.
        x_given = x_column.is_valid().to_numpy(zero_copy_only=False)
        y_given = y_column.is_valid().to_numpy(zero_copy_only=False)
        problems = (x_given ^ y_given) | (x_given & ~np.isfinite(x)) | (y_given & ~np.isfinite(y))
        if problems.any():
            row = int(np.flatnonzero(problems)[0])
            shown = [v if given else "empty" for v, given in ((x[row], x_given[row]),
                                                              (y[row], y_given[row]))]
            raise InputDataError(
                f"{self.where}, row {first_row + row}: x/y ({self.xy[0]!r}, {self.xy[1]!r}) are "
                f"({shown[0]}, {shown[1]}); expected two finite numbers (or both empty for no "
                "geometry)"
            )


@contextmanager
def _gdal_stream(source: LayerSource, probe: _Probe, where: str, scratch_dir: Path,
                 limits: ShardLimits, index: int) -> Iterator[tuple[pa.Schema, Iterator]]:
    data_file = source.data_file
    gdal_path, encoding = probe.gdal_path, None
    declared = data_file.encoding
    if data_file.format is InputFormat.SHAPEFILE_ZIP and declared:
        encoding = _gdal_encoding(declared)
    elif data_file.format in _TEXT_FORMATS and declared and codecs.lookup(declared).name != "utf-8":
        suffix = source.path.suffix or ".txt"
        copy = _transcode_to_utf8(source.path, declared,
                                  scratch_dir / f"source-{index:04d}-utf8{suffix}", where)
        gdal_path = f"CSV:{copy}" if data_file.format is InputFormat.CSV else str(copy)
    csv_check = _CsvGeometryCheck(data_file, where) if data_file.format is InputFormat.CSV else None
    with ExitStack() as stack:
        caught: list[warnings.WarningMessage] = []
        if csv_check is not None:
            # GDAL reports unreadable CSV numbers only as a warning; catch it to fail loudly.
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
        try:
            meta, reader = stack.enter_context(open_arrow(
                gdal_path, layer=probe.gdal_layer, encoding=encoding,
                batch_size=limits.read_batch_rows, use_pyarrow=True, **dict(probe.open_options)))
        except UnicodeDecodeError as exc:
            raise InputDataError(
                f"{where}: column names are not valid in encoding {probe.encoding_note} "
                f"({exc.reason}); set 'encoding' in the manifest to the file's real encoding "
                "(e.g. 'cp1252')"
            ) from None
        except _GDAL_ERRORS as exc:
            raise InputDataError(
                f"{where} cannot be read as {data_file.format.value}: {exc}") from None
        geometry_name = meta.get("geometry_name") or "wkb_geometry"
        normalise = _Normaliser(reader.schema, geometry_name, where,
                                csv_check.columns if csv_check else ())

        def batches() -> Iterator[pa.RecordBatch]:
            row = 0
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except (pa.ArrowException, OSError, *_GDAL_ERRORS) as exc:
                    raise InputDataError(
                        f"{where}: reading failed after row {row} ({exc}); the file is corrupt or "
                        f"truncated, expected a valid {data_file.format.value} file"
                    ) from None
                if csv_check is not None:
                    csv_check(batch, geometry_name, row, caught)
                    caught.clear()
                out = normalise(batch)
                _check_utf8(out, row, where, probe.encoding_note)
                row += batch.num_rows
                yield out

        yield normalise.schema, batches()


@contextmanager
def _geoparquet_stream(source: LayerSource, where: str,
                       limits: ShardLimits) -> Iterator[tuple[pa.Schema, Iterator]]:
    parquet = _parquet_file(source.path, source.data_file)
    geo = _geo_metadata(parquet, source.data_file)
    primary = geo["primary_column"]
    covering = geo["columns"][primary].get("covering") or {}
    skip = {path[0] for spec in covering.values() if isinstance(spec, dict)
            for path in spec.values() if isinstance(path, list) and path}
    columns = [n for n in parquet.schema_arrow.names if n not in skip]
    schema = pa.schema([parquet.schema_arrow.field(n) for n in columns])
    normalise = _Normaliser(schema, primary, where)

    def batches() -> Iterator[pa.RecordBatch]:
        row = 0
        iterator = parquet.iter_batches(batch_size=limits.read_batch_rows, columns=columns,
                                        use_threads=False)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as exc:
                raise InputDataError(
                    f"{where}: reading failed after row {row} ({exc}); the file is corrupt or "
                    "truncated, expected a valid GeoParquet file"
                ) from None
            out = normalise(batch)
            _check_utf8(out, row, where, "UTF-8 (Parquet)")
            row += batch.num_rows
            yield out

    try:
        yield normalise.schema, batches()
    finally:
        parquet.close()


# --------------------------------------------------------------------------------------
# Geometry facts: WKB types and bounds, validated
# --------------------------------------------------------------------------------------

_TYPE_NAMES = {1: "Point", 2: "LineString", 3: "Polygon", 4: "MultiPoint", 5: "MultiLineString",
               6: "MultiPolygon", 7: "GeometryCollection", 8: "CircularString",
               9: "CompoundCurve", 10: "CurvePolygon", 11: "MultiCurve", 12: "MultiSurface",
               15: "PolyhedralSurface", 16: "TIN", 17: "Triangle"}
_FAMILIES = {1: "point", 4: "point", 2: "line", 5: "line", 3: "polygon", 6: "polygon"}


def _binary_parts(array: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, lengths, data bytes) of a binary/string array, without copying values."""
    n = len(array)
    offsets_buffer, data_buffer = array.buffers()[1], array.buffers()[2]
    if n == 0 or offsets_buffer is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    offsets = np.frombuffer(offsets_buffer, dtype=np.int32)[array.offset: array.offset + n + 1]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else \
        np.zeros(0, np.uint8)
    starts = offsets[:-1].astype(np.int64)
    return starts, np.diff(offsets).astype(np.int64), data


@dataclass
class _WkbHeaders:
    valid: np.ndarray  # bool: a geometry is present
    kind: np.ndarray  # int: 1..17 (0 where missing)
    has_z: np.ndarray  # bool
    dims_xy: np.ndarray  # bool: plain 2D/ISO Z without EWKB extras (point fast path)
    little: np.ndarray  # bool


def _wkb_headers(array: pa.Array) -> tuple[_WkbHeaders, np.ndarray, np.ndarray, np.ndarray]:
    starts, lengths, data = _binary_parts(array)
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
    return _WkbHeaders(valid, kind, has_z, plain, little), starts, lengths, data


def _type_name(kind: int, has_z: bool) -> str:
    return _TYPE_NAMES.get(kind, f"WKB type {kind}") + (" Z" if has_z else "")


def _geometry_types(headers: _WkbHeaders) -> list[str]:
    present = headers.valid & (headers.kind > 0)
    return _type_names(headers.kind[present] * 2 + headers.has_z[present])


def _type_names(codes: np.ndarray) -> list[str]:
    """Type names of ``kind * 2 + has_z`` codes (0: no geometry)."""
    present = np.flatnonzero(np.bincount(codes.astype(np.int64)))
    return sorted(_type_name(int(code) // 2, bool(code % 2)) for code in present if code)


def _not_finite(where: str, row: int) -> InputDataError:
    return InputDataError(f"{where}, row {row}: coordinates are NaN or infinite; expected finite "
                          "numbers")


def _point_coordinates(headers: _WkbHeaders, starts: np.ndarray, lengths: np.ndarray,
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


def _bounds(array: pa.Array, where: str, first_row: int) -> tuple[list[np.ndarray], _WkbHeaders]:
    """minx, miny, maxx, maxy per row (NaN for missing/empty geometries), rows validated."""
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
    bounds = np.empty((len(array), 4))
    # Parse at most ~_PARSE_BYTES of WKB at a time: a batch of large polygons would otherwise
    # hold several times its size in GEOS objects and coordinate copies.
    start = 0
    cumulative = np.cumsum(lengths)
    while start < len(array):
        base = cumulative[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(cumulative, base + _PARSE_BYTES, side="right")))
        _parse_bounds(array.slice(start, stop - start), headers.valid[start:stop],
                      bounds[start:stop], where, first_row + start)
        start = stop
    return [np.ascontiguousarray(bounds[:, i]) for i in range(4)], headers


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


# --------------------------------------------------------------------------------------
# Hilbert curve
# --------------------------------------------------------------------------------------

_STEP_BITS = 8


@cache
def _hilbert_tables() -> tuple[np.ndarray, np.ndarray]:
    """Hilbert digits and next orientation for (orientation, 8 bits of x, 8 bits of y).

    The orientation is the transform accumulated so far, an element of the group generated
    by "swap x/y" and "complement both": bit 0 = swapped, bit 1 = complemented. One level
    reads the transformed bits (tx, ty), emits the quadrant digit (3*tx) ^ ty and, in the
    lower quadrants (ty == 0), swaps, complementing too when tx == 1.
    """
    side = 1 << _STEP_BITS
    state = np.repeat(np.arange(4, dtype=np.int64), side * side)
    xs = np.tile(np.repeat(np.arange(side, dtype=np.int64), side), 4)
    ys = np.tile(np.arange(side, dtype=np.int64), 4 * side)
    swap, flip = state & 1, state >> 1
    digits = np.zeros_like(state)
    for bit in range(_STEP_BITS - 1, -1, -1):
        bx, by = ((xs >> bit) & 1) ^ flip, ((ys >> bit) & 1) ^ flip
        tx, ty = np.where(swap == 1, by, bx), np.where(swap == 1, bx, by)
        digits = (digits << 2) | ((3 * tx) ^ ty)
        lower = (ty == 0).astype(np.int64)
        swap, flip = swap ^ lower, flip ^ (lower & tx)
    # Small dtypes keep the tables (0.75 MiB) cache-friendly; the next orientation is stored
    # pre-shifted into place in the next lookup index.
    return digits.astype(np.uint16), ((swap | (flip << 1)) << 16).astype(np.int32)


def hilbert_index(ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """Distance along a Hilbert curve of 2^32 x 2^32 cells, for cell coordinates < 2^32.

    Equal to the classic ``xy2d(2**32, x, y)``; computed 8 bits of each axis at a time.
    """
    digits, next_state = _hilbert_tables()
    x, y = np.asarray(ix, dtype=np.int64), np.asarray(iy, dtype=np.int64)
    key = np.zeros(x.shape, dtype=np.uint64)
    state = np.zeros(x.shape, dtype=np.int32)
    for shift in range(32 - _STEP_BITS, -1, -_STEP_BITS):
        index = state | (((x >> shift) & 0xFF) << 8) | ((y >> shift) & 0xFF)
        key = (key << np.uint64(16)) | digits[index]
        state = next_state[index]
    return key


@dataclass(frozen=True)
class _Grid:
    """Maps bbox centres to Hilbert keys over a layer's extent (one scale for both axes)."""

    minx: float
    miny: float
    scale: float

    @classmethod
    def over(cls, extent: np.ndarray) -> _Grid:
        minx, miny, maxx, maxy = (float(v) for v in extent)
        size = max(maxx - minx, maxy - miny)
        return cls(minx, miny, (2.0**32 - 1) / size if size > 0 else 0.0)

    def keys(self, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
        """Hilbert keys of bbox centres; rows without a geometry (NaN) sort last."""
        missing = np.isnan(cx)
        limit = 2.0**32 - 1
        cells = []
        for value, low in ((cx, self.minx), (cy, self.miny)):
            scaled = (value - low) * self.scale
            scaled[missing] = 0.0
            cells.append(np.clip(scaled, 0.0, limit, out=scaled).astype(np.int64))
        keys = hilbert_index(*cells)
        keys[missing] = _EMPTY_KEY
        return keys

    def batch_keys(self, batch: pa.RecordBatch | pa.Table) -> np.ndarray:
        minx, miny, maxx, maxy = (_float_column(batch, name) for name in _BOUNDS)
        return self.keys((minx + maxx) * 0.5, (miny + maxy) * 0.5)


def _float_column(batch: pa.RecordBatch | pa.Table, name: str) -> np.ndarray:
    column = batch.column(name)
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 0:
            return np.zeros(0)
        column = column.combine_chunks() if column.num_chunks > 1 else column.chunk(0)
    return column.to_numpy(zero_copy_only=False)


# --------------------------------------------------------------------------------------
# Schema agreement across a layer's files
# --------------------------------------------------------------------------------------


def _promoted(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    if pa.types.is_integer(a) and pa.types.is_integer(b):
        return pa.int64()
    if (pa.types.is_integer(a) or pa.types.is_floating(a)) and (
            pa.types.is_integer(b) or pa.types.is_floating(b)):
        return pa.float64()
    return None


def _unify(current: pa.Schema, current_name: str, new: pa.Schema, new_name: str,
           layer: str) -> pa.Schema:
    """The schema both files fit in (numbers widen), or an error naming the differences."""
    problems = []
    only_current = [n for n in current.names if n not in new.names]
    only_new = [n for n in new.names if n not in current.names]
    if only_current:
        problems.append(f"only in {current_name!r}: {only_current}")
    if only_new:
        problems.append(f"only in {new_name!r}: {only_new}")
    fields = []
    for item in current:
        if item.name not in new.names:
            continue
        other = new.field(item.name).type
        merged = _promoted(item.type, other)
        if merged is None:
            problems.append(f"column {item.name!r} is {item.type} in {current_name!r} but "
                            f"{other} in {new_name!r}")
        else:
            fields.append(pa.field(item.name, merged))
    if problems:
        raise InputDataError(
            f"layer {layer!r}: files {current_name!r} and {new_name!r} have different columns ("
            + "; ".join(problems) + "); expected the same columns and types in every file of a "
            "layer — align the files or feed them to different layers"
        )
    return pa.schema(fields)


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    if batch.schema.equals(schema):
        return batch
    arrays = [batch.column(item.name).cast(item.type) for item in schema]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


# --------------------------------------------------------------------------------------
# Pass 1: read every source, validate, spill
# --------------------------------------------------------------------------------------


class _Sample:
    """A fixed-size uniform random sample of bbox centres (bottom-k random priorities)."""

    def __init__(self, size: int):
        self.size = size
        self.rng = np.random.default_rng(20_240_601)
        self.priority = np.zeros(0)
        self.centres = np.zeros((0, 2))

    def add(self, cx: np.ndarray, cy: np.ndarray) -> None:
        priority = self.rng.random(len(cx))
        keep = ~np.isnan(cx)
        if len(self.priority) >= self.size:
            keep &= priority < self.priority.max()  # cannot enter the bottom-k otherwise
        if not keep.any():
            return
        priority = np.concatenate([self.priority, priority[keep]])
        centres = np.concatenate([self.centres, np.column_stack([cx[keep], cy[keep]])])
        if len(priority) > self.size:
            best = np.argpartition(priority, self.size)[: self.size]
            priority, centres = priority[best], centres[best]
        self.priority, self.centres = priority, centres


class _SourceStore:
    """One source's validated batches: in memory until the layer outgrows the budget."""

    def __init__(self, path: Path):
        self.path = path
        self.schema: pa.Schema | None = None
        self.batches: list[pa.RecordBatch] = []
        self.writer: ipc.RecordBatchStreamWriter | None = None
        self.sink: pa.OSFile | None = None

    def add(self, batch: pa.RecordBatch) -> None:
        if self.schema is None:
            self.schema = batch.schema
        if self.writer is not None:
            self.writer.write_batch(batch)
        else:
            self.batches.append(batch)

    def spill(self) -> None:
        if self.writer is None and self.schema is not None:
            self.sink = pa.OSFile(str(self.path), "wb")
            self.writer = ipc.new_stream(self.sink, self.schema)
            for batch in self.batches:
                self.writer.write_batch(batch)
            self.batches = []

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sink.close()
            self.writer = None

    def read(self) -> Iterator[pa.RecordBatch]:
        if self.sink is None:
            yield from self.batches
            return
        with pa.OSFile(str(self.path), "rb") as handle:
            yield from ipc.open_stream(handle)
        self.path.unlink(missing_ok=True)


@dataclass
class _Pass1:
    """What reading a layer found, and where its validated rows are."""

    stores: list[_SourceStore]
    schema: pa.Schema  # attributes + geometry, unified over the sources
    crs: CRS
    rows: int
    nbytes: int
    in_memory: bool
    extent: np.ndarray  # of bbox centres: minx, miny, maxx, maxy (NaN when no geometry)
    sample: _Sample
    geometry_types: list[str]
    rows_per_source: dict[str, int]


class _Collector:
    """Validates a layer's batches, adds bounds and type columns, and stores them."""

    def __init__(self, layer: str, budget: int, spill_now: bool):
        self.layer, self.budget, self.spilled = layer, budget, spill_now
        self.stores: list[_SourceStore] = []
        self.sample = _Sample(_SAMPLE_SIZE)
        self.extent = np.array([np.inf, np.inf, -np.inf, -np.inf])
        self.families: dict[str, tuple[str, str, int]] = {}  # family -> (file, type, row)
        self.types: set[str] = set()
        self.rows = 0
        self.nbytes = 0

    def add(self, batch: pa.RecordBatch, file: str, where: str, first_row: int) -> None:
        bounds, headers = _bounds(batch.column(GEOMETRY), where, first_row)
        _check_families(headers, self.families, file, where, first_row, self.layer)
        self.types.update(_geometry_types(headers))
        cx, cy = (bounds[0] + bounds[2]) * 0.5, (bounds[1] + bounds[3]) * 0.5
        if not np.isnan(cx).all():
            low = np.minimum(self.extent[:2], [np.nanmin(cx), np.nanmin(cy)])
            high = np.maximum(self.extent[2:], [np.nanmax(cx), np.nanmax(cy)])
            self.extent = np.concatenate([low, high])
        self.sample.add(cx, cy)
        codes = np.where(headers.valid, headers.kind * 2 + headers.has_z, 0).astype(np.uint8)
        full = pa.RecordBatch.from_arrays(
            [*batch.columns, *(pa.array(b) for b in bounds), pa.array(codes)],
            names=[*batch.schema.names, *_BOUNDS, _TYPE])
        store = self.stores[-1]
        store.add(full)
        self.nbytes += full.nbytes
        self.rows += full.num_rows
        if not self.spilled and self.nbytes > self.budget:
            self.spilled = True
            for each in self.stores:
                each.spill()
        elif self.spilled:
            store.spill()


def _read_sources(layer: str, sources: list[LayerSource], scratch_dir: Path,
                  limits: ShardLimits) -> _Pass1:
    probes = [s.probe or _probe(s.path, s.data_file, s.source_layer, limits) for s in sources]
    crs = _layer_crs(layer, sources, probes)
    budget = _in_memory_bytes(limits)
    # A layer whose files are already larger than the in-memory budget goes to disk from
    # the first batch: holding the budget's worth first would only leave it in the allocator.
    collector = _Collector(layer, budget, sum(_stored_bytes(s) for s in sources) > budget)
    schema: pa.Schema | None = None
    schema_owner = ""
    rows_per_source: dict[str, int] = {}
    for index, (source, probe) in enumerate(zip(sources, probes, strict=True)):
        where = _where(source.data_file, layer, source.source_layer)
        collector.stores.append(_SourceStore(scratch_dir / f"source-{index:04d}.arrows"))
        opener = (_geoparquet_stream(source, where, limits) if probe.gdal_path is None
                  else _gdal_stream(source, probe, where, scratch_dir, limits, index))
        rows = 0
        with opener as (source_schema, batches):
            if schema is None:
                schema, schema_owner = source_schema, source.data_file.path
            else:
                schema = _unify(schema, schema_owner, source_schema, source.data_file.path, layer)
            # GDAL reports unreadable CSV numbers only as a warning, which reaches Python on
            # the reading thread alone: CSV is read on this one. ``closing`` stops the helper
            # thread (on errors too) before the reader's dataset closes.
            csv = source.data_file.format is InputFormat.CSV
            with closing(batches if csv else _prefetched(batches)) as stream:
                for batch in stream:
                    if batch.num_rows:
                        collector.add(batch, source.data_file.path, where, rows)
                        rows += batch.num_rows
        collector.stores[-1].close()
        if rows == 0:
            raise InputDataError(f"{where} has no features; expected at least one row")
        rows_per_source[str(source.path)] = rows
    assert schema is not None
    extent = collector.extent if np.isfinite(collector.extent).all() else np.full(4, np.nan)
    return _Pass1(collector.stores, schema, crs, collector.rows, collector.nbytes,
                  not collector.spilled, extent, collector.sample, sorted(collector.types),
                  rows_per_source)


def _prefetched(items: Iterator[pa.RecordBatch], depth: int = 2) -> Iterator[pa.RecordBatch]:
    """Iterate ``items`` on a helper thread, ``depth`` batches ahead.

    GDAL decoding (which releases the GIL) then overlaps with validating and spilling the
    previous batch. The helper is stopped and joined before this generator finishes, so the
    reader is never touched after its dataset closes.
    """
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()
    finished = object()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.05)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(finished)
        except BaseException as exc:  # handed to the consuming thread, which re-raises it
            offer(exc)

    helper = threading.Thread(target=produce, name="shard-read", daemon=True)
    helper.start()
    try:
        while True:
            item = queue.get()
            if item is finished:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        helper.join()


def _stored_bytes(source: LayerSource) -> int:
    if source.data_file.format is InputFormat.SHAPEFILE_ZIP:
        with zipfile.ZipFile(source.path) as archive:
            return sum(member.file_size for member in archive.infolist())
    return source.path.stat().st_size


def _check_families(headers: _WkbHeaders, families: dict[str, tuple[str, str, int]], file: str,
                    where: str, first_row: int, layer: str) -> None:
    present = headers.valid
    kinds = headers.kind[present]
    if not len(kinds):
        return
    rows = np.flatnonzero(present)
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


# --------------------------------------------------------------------------------------
# Chunk cutting and encoding
# --------------------------------------------------------------------------------------


def _row_sizes(table: pa.Table, columns: list[str]) -> np.ndarray:
    """Arrow bytes each row takes in an output chunk (plus its 32-byte bbox)."""
    sizes = np.full(table.num_rows, 32, dtype=np.int64)
    for name in columns:
        column = table.column(name)
        data_type = column.type
        if pa.types.is_binary(data_type) or pa.types.is_string(data_type):
            parts = [_binary_parts(chunk)[1] + 4 for chunk in column.chunks]
            sizes += np.concatenate(parts) if parts else 0
        elif pa.types.is_fixed_size_binary(data_type):
            sizes += data_type.byte_width + 4  # as the binary column it is written as
        elif data_type.bit_width and data_type.bit_width >= 8:
            sizes += data_type.bit_width // 8
        elif pa.types.is_boolean(data_type) or pa.types.is_null(data_type):
            sizes += 1
        elif table.num_rows:
            sizes += -(-column.nbytes // table.num_rows)
    return sizes


def _covering(table: pa.Table, bounds: list[np.ndarray]) -> pa.StructArray:
    """The bbox covering column: float32 rounded outwards, so each box still contains its
    geometry (GeoParquet allows FLOAT; it takes a third less space than DOUBLE), and null
    exactly where the geometry is null, as the specification requires."""
    rounded = []
    for values, outwards in zip(bounds, (-np.inf, -np.inf, np.inf, np.inf), strict=True):
        narrow = values.astype(np.float32)
        inside = narrow > values if outwards < 0 else narrow < values
        rounded.append(np.where(inside, np.nextafter(narrow, np.float32(outwards)), narrow))
    missing = pc.invert(table.column(GEOMETRY).is_valid()).combine_chunks()
    return pa.StructArray.from_arrays([pa.array(v) for v in rounded], names=_COVERING_FIELDS,
                                      mask=missing)


@dataclass
class _Encoded:
    rows: int
    data: bytes
    bbox: BBox | None
    sha256: str


class _ChunkWriter:
    """Cuts the sorted row stream into bounded chunks and encodes them (GeoParquet 1.1)."""

    def __init__(self, layer: str, crs: CRS, schema: pa.Schema, sink: ChunkSink,
                 limits: ShardLimits):
        self.layer, self.sink, self.limits = layer, sink, limits
        self.crs_text = _crs_text(crs)
        self.projjson = crs.to_json_dict()
        self.schema = schema
        self.attributes = [n for n in schema.names if n != GEOMETRY]
        self.output_columns = [*self.attributes, GEOMETRY]
        self.dictionary_columns = [n for n in self.attributes
                                   if pa.types.is_string(schema.field(n).type)]
        self.gathered = [*self.output_columns, *_BOUNDS, _TYPE]
        # Rows of the next chunk, as (table, row indices) pieces gathered by the encoder.
        self.pending: list[tuple[pa.Table, np.ndarray]] = []
        self.pending_rows = 0
        self.pending_bytes = 0
        self.pool = ThreadPoolExecutor(max_workers=limits.encode_threads,
                                       thread_name_prefix="shard-encode")
        self.in_flight: deque[Future] = deque()
        self.chunks: list[Chunk] = []
        self.row_offset = 0

    def add_run(self, table: pa.Table, order: np.ndarray) -> None:
        """Append ``table`` rows in the order ``order`` to the output stream."""
        if not len(order):
            return
        sizes = _row_sizes(table, self.output_columns)[order]
        cumulative = np.cumsum(sizes)
        position, total = 0, len(order)
        while position < total:
            before = cumulative[position - 1] if position else 0
            room_rows = self.limits.chunk_rows - self.pending_rows
            room_bytes = self.limits.chunk_bytes - self.pending_bytes
            by_bytes = int(np.searchsorted(cumulative, before + room_bytes, side="right")) - position
            count = min(room_rows, by_bytes, total - position)
            if count <= 0:
                if self.pending_rows:
                    self._flush()
                    continue
                count = 1  # a single row larger than chunk_bytes still makes a chunk
            self.pending.append((table, order[position: position + count]))
            self.pending_rows += count
            self.pending_bytes += int(cumulative[position + count - 1] - before)
            position += count
            if position < total or self.pending_rows >= self.limits.chunk_rows:
                self._flush()
        # Rows carried over to the next run are copied, so this run's table can be freed.
        self.pending = [(piece.select(self.gathered).take(pa.array(rows)), np.arange(len(rows)))
                        if piece is table else (piece, rows) for piece, rows in self.pending]

    def finish(self) -> list[Chunk]:
        try:
            if self.pending_rows:
                self._flush()
            while self.in_flight:
                self._deliver(self.in_flight.popleft())
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        return self.chunks

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _flush(self) -> None:
        pieces = self.pending
        self.pending, self.pending_rows, self.pending_bytes = [], 0, 0
        self.in_flight.append(self.pool.submit(self._gather_and_encode, pieces))
        while len(self.in_flight) > self.limits.encode_threads:
            self._deliver(self.in_flight.popleft())

    def _deliver(self, future: Future) -> None:
        for encoded in future.result():
            ordinal = len(self.chunks)
            key = self.sink(ordinal, encoded.data)
            self.chunks.append(Chunk(
                key=key, layer=self.layer, ordinal=ordinal, row_offset=self.row_offset,
                rows=encoded.rows, bbox=encoded.bbox, crs=self.crs_text, bytes=len(encoded.data),
                sha256=encoded.sha256))
            self.row_offset += encoded.rows

    def _gather_and_encode(self, pieces: list[tuple[pa.Table, np.ndarray]]) -> list[_Encoded]:
        # Runs on an encoder thread: Arrow's take and Parquet writing release the GIL.
        tables = [_binary_geometry(table.select(self.gathered).take(pa.array(rows)))
                  for table, rows in pieces]
        pieces.clear()  # let the sorted run go as soon as its rows are gathered
        return self._encode_bounded(pa.concat_tables(tables) if len(tables) > 1 else tables[0])

    def _encode_bounded(self, table: pa.Table) -> list[_Encoded]:
        encoded = self._encode(table)
        if len(encoded.data) <= self.limits.chunk_bytes or table.num_rows == 1:
            return [encoded]
        half = table.num_rows // 2
        return self._encode_bounded(table.slice(0, half)) + \
            self._encode_bounded(table.slice(half))

    def _encode(self, table: pa.Table) -> _Encoded:
        values = [_float_column(table, name) for name in _BOUNDS]
        covering = _covering(table, values)
        types = _type_names(_float_column(table, _TYPE))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: every geometry empty
            box = (np.nanmin(values[0]), np.nanmin(values[1]), np.nanmax(values[2]),
                   np.nanmax(values[3]))
        bbox = None if np.isnan(box).any() else tuple(float(v) for v in box)
        column_meta: dict = {"encoding": "WKB", "geometry_types": sorted(types),
                             "crs": self.projjson}
        if bbox is not None:
            column_meta["bbox"] = list(bbox)
        column_meta["covering"] = {COVERING: {n: [COVERING, n] for n in _COVERING_FIELDS}}
        geo = {"version": "1.1.0", "primary_column": GEOMETRY, "columns": {GEOMETRY: column_meta}}
        out = pa.Table.from_arrays(
            [*(table.column(n) for n in self.output_columns), covering],
            schema=pa.schema([*(self.schema.field(n) for n in self.output_columns),
                              pa.field(COVERING, covering.type)],
                             metadata={b"geo": json.dumps(geo).encode()}))
        buffer = pa.BufferOutputStream()
        pq.write_table(
            out, buffer, compression="zstd", row_group_size=65_536,
            use_dictionary=self.dictionary_columns or False,
            # Statistics only where readers prune: the covering bbox.
            write_statistics=[f"{COVERING}.{n}" for n in _COVERING_FIELDS])
        data = buffer.getvalue().to_pybytes()
        return _Encoded(table.num_rows, data, bbox, hashlib.sha256(data).hexdigest())


# --------------------------------------------------------------------------------------
# Passes 2 and 3: partition into buckets, sort each, emit
# --------------------------------------------------------------------------------------


class _Buckets:
    """Range-partitions rows by key into IPC files, buffering small pieces per bucket."""

    def __init__(self, folder: Path, boundaries: np.ndarray, schema: pa.Schema, budget: int):
        self.folder, self.boundaries, self.schema, self.budget = folder, boundaries, schema, budget
        count = len(boundaries) + 1
        self.paths = [folder / f"bucket-{i:04d}.arrows" for i in range(count)]
        self.writers: list[ipc.RecordBatchStreamWriter | None] = [None] * count
        self.files: list[pa.OSFile | None] = [None] * count
        self.buffers: list[list[pa.RecordBatch]] = [[] for _ in range(count)]
        self.buffered_rows = [0] * count
        self.rows = [0] * count
        self.nbytes = [0] * count
        self.min_key = [np.uint64(2**64 - 1)] * count
        self.max_key = [np.uint64(0)] * count
        self.buffered_bytes = 0

    def add(self, batch: pa.RecordBatch, keys: np.ndarray) -> None:
        bucket = np.searchsorted(self.boundaries, keys, side="right")
        order = np.argsort(bucket, kind="stable")
        counts = np.bincount(bucket, minlength=len(self.paths))
        batch = batch.append_column(_KEY, pa.array(keys)).take(pa.array(order))
        keys = keys[order]
        start = 0
        for index in np.flatnonzero(counts).tolist():
            stop = start + int(counts[index])
            piece = batch.slice(start, stop - start)
            self.buffers[index].append(piece)
            self.buffered_rows[index] += piece.num_rows
            self.rows[index] += piece.num_rows
            size = piece.nbytes
            self.nbytes[index] += size
            self.buffered_bytes += size
            self.min_key[index] = min(self.min_key[index], keys[start:stop].min())
            self.max_key[index] = max(self.max_key[index], keys[start:stop].max())
            if self.buffered_rows[index] >= _BUCKET_FLUSH_ROWS:
                self._flush(index)
            start = stop
        if self.buffered_bytes > self.budget:
            for index in range(len(self.paths)):
                self._flush(index)

    def _flush(self, index: int) -> None:
        if not self.buffers[index]:
            return
        if self.writers[index] is None:
            self.files[index] = pa.OSFile(str(self.paths[index]), "wb")
            self.writers[index] = ipc.new_stream(self.files[index], self.schema)
        table = pa.Table.from_batches(self.buffers[index])
        for batch in table.combine_chunks().to_batches():
            self.writers[index].write_batch(batch)
        self.buffered_bytes -= sum(b.nbytes for b in self.buffers[index])
        self.buffers[index], self.buffered_rows[index] = [], 0

    def close(self) -> None:
        for index in range(len(self.paths)):
            self._flush(index)
            if self.writers[index] is not None:
                self.writers[index].close()
                self.files[index].close()


def _read_bucket(path: Path) -> Iterator[pa.RecordBatch]:
    with pa.OSFile(str(path), "rb") as handle:
        yield from ipc.open_stream(handle)


def _in_memory_bytes(limits: ShardLimits) -> int:
    """A layer (or a bucket) up to this size is sorted in memory."""
    return limits.sort_memory_bytes // 2


def _bucket_bytes(limits: ShardLimits) -> int:
    """Target size of an external-sort bucket: a quarter of the in-memory size, so that an
    external sort (plus what the read pass left in the allocator) stays below the memory of
    sorting the largest in-memory layer."""
    return limits.sort_memory_bytes // 8


def _quantile_boundaries(keys: np.ndarray, count: int) -> np.ndarray:
    if count <= 1 or not len(keys):
        return np.zeros(0, dtype=np.uint64)
    ordered = np.sort(keys)
    picks = ordered[(np.arange(1, count) * len(ordered)) // count]
    return np.unique(picks)


def _emit_bucket(path: Path, rows: int, nbytes: int, low: np.uint64, high: np.uint64,
                 schema: pa.Schema, writer: _ChunkWriter, scratch: Path, limits: ShardLimits,
                 depth: int = 0) -> None:
    if not rows:
        return
    if low == high:
        # Every row has the same key: the file is already in (key, source order).
        for batch in _read_bucket(path):
            table = pa.Table.from_batches([batch])
            writer.add_run(table, np.arange(batch.num_rows))
        path.unlink(missing_ok=True)
        return
    if nbytes <= _in_memory_bytes(limits):
        table = pa.Table.from_batches(list(_read_bucket(path)), schema=schema)
        path.unlink(missing_ok=True)
        writer.add_run(_fixed_size_geometry(table), _sorted_order(_key_column(table)))
        return
    # Too big to sort in memory (skewed data): split on this bucket's own key quantiles.
    strided = [batch.column(_KEY).to_numpy()[:: max(1, batch.num_rows // 64)]
               for batch in _read_bucket(path)]
    candidates = np.concatenate(strided)
    count = min(_MAX_BUCKETS, max(2, -(-nbytes // _bucket_bytes(limits))))
    boundaries = _quantile_boundaries(candidates, count)
    boundaries = boundaries[(boundaries > low) & (boundaries <= high)]
    if not len(boundaries):
        boundaries = np.array([high], dtype=np.uint64)  # split off the largest key at least
    folder = scratch / f"split-{depth}-{path.stem}"
    folder.mkdir()
    buckets = _Buckets(folder, boundaries, schema, _bucket_bytes(limits) // 2)
    for batch in _read_bucket(path):
        buckets.add(batch.drop_columns([_KEY]), batch.column(_KEY).to_numpy())
    buckets.close()
    path.unlink(missing_ok=True)
    for index, sub in enumerate(buckets.paths):
        _emit_bucket(sub, buckets.rows[index], buckets.nbytes[index], buckets.min_key[index],
                     buckets.max_key[index], schema, writer, folder, limits, depth + 1)


def _fixed_size_geometry(table: pa.Table) -> pa.Table:
    """The geometry column as fixed-size binary when every WKB has the same size (points).

    Gathering rows of fixed-size values is a plain strided copy, several times faster than
    gathering variable-size binary; chunks are written back as binary. A zero-copy view."""
    column = table.column(GEOMETRY)
    width, parts = None, []
    for chunk in column.chunks:
        if not len(chunk):
            continue
        starts, lengths, _ = _binary_parts(chunk)
        if chunk.null_count or not (lengths == lengths[0]).all() or width not in (None, lengths[0]):
            return table
        width = int(lengths[0])
        values = chunk.buffers()[2].slice(int(starts[0]), len(chunk) * width)
        parts.append(pa.Array.from_buffers(pa.binary(width), len(chunk), [None, values]))
    if width is None:
        return table
    index = table.schema.get_field_index(GEOMETRY)
    return table.set_column(index, GEOMETRY, pa.chunked_array(parts, type=pa.binary(width)))


def _binary_geometry(table: pa.Table) -> pa.Table:
    """Undo :func:`_fixed_size_geometry` (GeoParquet stores WKB as variable-size binary)."""
    column = table.column(GEOMETRY)
    if not pa.types.is_fixed_size_binary(column.type):
        return table
    return table.set_column(table.schema.get_field_index(GEOMETRY), GEOMETRY,
                            column.cast(pa.binary()))


def _sorted_order(keys: np.ndarray) -> np.ndarray:
    """Positions that sort ``keys``, equal keys in position order (a stable sort).

    numpy's stable sort of 64-bit integers is a merge sort, twice as slow as its quicksort;
    keys are rarely equal, so quicksort and then order the (few) runs of equal keys.
    """
    order = np.argsort(keys)
    ordered = keys[order]
    equal = np.flatnonzero(ordered[1:] == ordered[:-1])
    if len(equal):
        tied = np.union1d(equal, equal + 1)  # positions inside runs of equal keys
        order[tied] = order[tied][np.lexsort((order[tied], ordered[tied]))]
    return order


def _key_column(table: pa.Table) -> np.ndarray:
    column = table.column(_KEY)
    return (column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)).to_numpy()


def _sort_and_emit(first: _Pass1, writer: _ChunkWriter, scratch_dir: Path,
                   limits: ShardLimits) -> None:
    grid = _Grid.over(first.extent) if np.isfinite(first.extent).all() else _Grid(0.0, 0.0, 0.0)
    full_schema = pa.schema([*first.schema, *(pa.field(n, pa.float64()) for n in _BOUNDS),
                             pa.field(_TYPE, pa.uint8())])
    if first.in_memory:
        batches = [_conform(b, full_schema) for store in first.stores for b in store.read()]
        for store in first.stores:
            store.batches = []
        keys = np.concatenate([grid.batch_keys(b) for b in batches])
        table = _fixed_size_geometry(pa.Table.from_batches(batches, schema=full_schema))
        writer.add_run(table, _sorted_order(keys))
        return
    target = _bucket_bytes(limits)
    count = int(min(_MAX_BUCKETS, max(2, -(-first.nbytes // target))))
    sample_keys = grid.keys(first.sample.centres[:, 0].copy(), first.sample.centres[:, 1].copy())
    boundaries = _quantile_boundaries(sample_keys, count)
    folder = scratch_dir / "buckets"
    folder.mkdir()
    bucket_schema = full_schema.append(pa.field(_KEY, pa.uint64()))
    buckets = _Buckets(folder, boundaries, bucket_schema, target // 2)
    for store in first.stores:
        for batch in store.read():
            batch = _conform(batch, full_schema)
            buckets.add(batch, grid.batch_keys(batch))
    buckets.close()
    for index, path in enumerate(buckets.paths):
        _emit_bucket(path, buckets.rows[index], buckets.nbytes[index], buckets.min_key[index],
                     buckets.max_key[index], bucket_schema, writer, folder, limits)
        # Hand freed bucket memory back to the OS: otherwise the allocator's cache, not the
        # data, would grow with the number of buckets.
        pa.default_memory_pool().release_unused()


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def shard_layer(layer: str, sources: list[LayerSource], sink: ChunkSink, *, scratch_dir: Path,
                limits: ShardLimits | None = None) -> ShardedLayer:
    """Shard every source of ``layer`` into Hilbert-ordered GeoParquet chunks handed to ``sink``.

    ``scratch_dir`` receives the spill files (removed as they are consumed); the caller owns
    the directory. Raises :class:`InputDataError` for any problem with the input.
    """
    limits = limits or ShardLimits()
    if not sources:
        raise ValueError(f"layer {layer!r}: no sources to shard")
    work = Path(tempfile.mkdtemp(prefix=f"shard-{layer}-", dir=scratch_dir))
    try:
        first = _read_sources(layer, sources, work, limits)
        writer = _ChunkWriter(layer, first.crs, first.schema, sink, limits)
        try:
            _sort_and_emit(first, writer, work, limits)
        except BaseException:
            writer.abort()
            raise
        chunks = writer.finish()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if sum(c.rows for c in chunks) != first.rows:
        raise ReconciliationError(f"layer {layer!r}: the chunks hold {sum(c.rows for c in chunks)} "
                                  f"rows but the sources {first.rows}")
    return ShardedLayer(
        chunks=LayerChunks(layer=layer, crs=_crs_text(first.crs), chunks=chunks),
        schema=first.schema, geometry_types=first.geometry_types,
        rows_per_source=first.rows_per_source)
