"""Planning: check every landed file before any is read, and group the sources by layer.

Checked without reading features: the file's bytes against its declared format (before any
GDAL call, with GDAL locked down: ``gdal_guard``), zip safety (member paths, encryption,
inflated size and ratio, from the central directory before GDAL opens the archive), the
driver GDAL detects against the declared format, that named layers and CSV columns exist,
and each layer's CRS. GDAL is given the declared driver as a path prefix where it takes one.
"""

from __future__ import annotations

import codecs
import json
import re
import unicodedata
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq
import pyogrio
from pyogrio.errors import DataLayerError

from libs.errors import InputDataError
from libs.manifest import FAMILY_SUFFIXES, DataFile, InputFormat
from libs.sharding.crs import layer_crs
from libs.sharding.gdal_guard import (
    DRIVER_FOR_FORMAT,
    PREFIXABLE_FORMATS,
    clean_gdal_message,
    lock_down_gdal,
)
from libs.sharding.limits import ShardLimits
from libs.sharding.sniffing import check_declared_format, check_shapefile_member, describe_content
from libs.sharding.sources import GDAL_ERRORS, TEXT_FORMATS, LayerSource, SourceProbe, describe_source

#: Problems listed when several landed files cannot be used (the rest are counted).
MAX_LISTED_FILE_PROBLEMS = 20
#: Largest ``.cpg`` member read: a code page file holds a name such as "UTF-8" or "1252".
MAX_CPG_BYTES = 64


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


def _check_zip(path: Path, data_file: DataFile, limits: ShardLimits) -> list[str]:
    """Validate an archive from its central directory; return its member names."""
    where = describe_source(data_file)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except zipfile.BadZipFile:
        raise InputDataError(
            f"{where}: declared shapefile_zip but it is not a zip archive (it looks like "
            f"{describe_content(path)}); expected a .zip holding .shp, .shx, .dbf and .prj"
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


def gdal_path_for(path: Path, data_file: DataFile) -> str:
    """The name GDAL opens a landed file by: the declared driver as a prefix where GDAL takes
    one, so content of another format is not even tried."""
    if data_file.format in PREFIXABLE_FORMATS:
        return f"{DRIVER_FOR_FORMAT[data_file.format]}:{path}"
    return str(path)


def _read_info(gdal_path: str, layer: str | None, **options: str) -> dict:
    lock_down_gdal()
    with warnings.catch_warnings():
        # e.g. "Measured (M) geometry types are not supported": the data is checked later.
        warnings.simplefilter("ignore")
        return pyogrio.read_info(gdal_path, layer=layer, **options)


def _detect_driver(gdal_path: str, path: Path, data_file: DataFile, layer: str | None) -> dict:
    """read_info of a GDAL source, with its driver checked against the declared format."""
    where = describe_source(data_file, source_layer=layer)
    expected = DRIVER_FOR_FORMAT[data_file.format]
    try:
        info = _read_info(gdal_path, layer)
    except DataLayerError as exc:
        raise InputDataError(f"{where}: {_gdal_says(exc, data_file, gdal_path, path)}; expected "
                             f"an existing layer (available: {_list_layers(gdal_path)})") from None
    except GDAL_ERRORS as exc:
        raise InputDataError(
            f"{where} cannot be read as {data_file.format.value}: GDAL says "
            f"{_gdal_says(exc, data_file, gdal_path, path)} (the file looks like "
            f"{describe_content(path)}); expected a valid {expected} file"
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


def _gdal_says(exc: Exception, data_file: DataFile, *local: str | Path) -> str:
    return clean_gdal_message(exc, PurePosixPath(data_file.path).name, *local)


def _list_layers(gdal_path: str) -> list[str]:
    lock_down_gdal()
    try:
        return [str(name) for name in pyogrio.list_layers(gdal_path)[:, 0]]
    except GDAL_ERRORS:
        return []


def open_parquet(path: Path, data_file: DataFile) -> pq.ParquetFile:
    """Open a landed GeoParquet file for streaming, or say what the file looks like instead."""
    try:
        return pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except (pa.ArrowInvalid, OSError) as exc:
        # GDAL is not asked what it is: it would open it with whatever driver matches
        raise InputDataError(
            f"{describe_source(data_file)}: declared geoparquet but it is not a Parquet file (it "
            f"looks like {describe_content(path)}; pyarrow says "
            f"{clean_gdal_message(exc, PurePosixPath(data_file.path).name, path)}); expected a "
            "GeoParquet 1.0 or 1.1 file"
        ) from None


def read_geo_metadata(parquet: pq.ParquetFile, data_file: DataFile) -> dict:
    """The file's GeoParquet ``geo`` metadata, checked: a primary WKB column the file has."""
    raw = (parquet.schema_arrow.metadata or {}).get(b"geo")
    where = describe_source(data_file)
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


def probe_source(path: Path, data_file: DataFile, source_layer: str | None,
                 limits: ShardLimits) -> SourceProbe:
    """Check a source is what the manifest says and find how to open it (no data is read)."""
    where = describe_source(data_file, source_layer=source_layer)
    fmt = data_file.format
    if not path.is_file():
        raise InputDataError(f"{where}: the landed copy of the file is missing")
    if data_file.encoding and fmt not in TEXT_FORMATS | {InputFormat.SHAPEFILE_ZIP}:
        if codecs.lookup(data_file.encoding).name != "utf-8":
            raise InputDataError(
                f"{where}: declares encoding {data_file.encoding!r}, but {fmt.value} stores text "
                "as UTF-8 by definition; remove 'encoding' from the manifest"
            )
    if fmt is InputFormat.GEOPARQUET:
        if source_layer is not None:
            raise InputDataError(f"{where}: a GeoParquet file has one layer; remove source_layer")
        geo = read_geo_metadata(open_parquet(path, data_file), data_file)
        return SourceProbe(None, None, _geoparquet_crs(geo), "UTF-8 (Parquet)")
    check_declared_format(path, data_file)
    gdal_path, encoding_note, options = gdal_path_for(path, data_file), "UTF-8", ()
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
        with zipfile.ZipFile(path) as archive:
            for member in (shp, _zip_sidecar(members, shp, ".shx")):
                check_shapefile_member(archive, member, data_file)
        # braces delimit the archive's own path: GDAL splits nothing inside them
        gdal_path, layer = f"/vsizip/{{{path.resolve()}}}/{shp}", None
        cpg = _zip_sidecar(members, shp, ".cpg")
        if data_file.encoding:
            encoding_note = f"{data_file.encoding} (declared in the manifest)"
        elif cpg is not None:
            encoding_note = f"{_read_cpg(path, cpg, data_file)} (declared by {PurePosixPath(cpg).name})"
        else:
            encoding_note = "UTF-8 (no .cpg and no encoding in the manifest)"
    elif data_file.encoding:
        encoding_note = f"{data_file.encoding} (declared in the manifest)"
    info = _detect_driver(gdal_path, path, data_file, layer)
    if fmt is InputFormat.CSV:
        options = _csv_options(data_file, where, info)
        info = _read_info(gdal_path, None, **dict(options))
    elif layer is None and fmt is not InputFormat.SHAPEFILE_ZIP:
        layers = _list_layers(gdal_path)
        layer = layers[0] if layers else None
    if info.get("geometry_type") is None and fmt is not InputFormat.CSV:
        raise InputDataError(f"{where}: the layer has no geometry column; expected spatial data")
    return SourceProbe(gdal_path, layer, info.get("crs"), encoding_note, options)


def _read_cpg(path: Path, cpg: str, data_file: DataFile) -> str:
    """The code page a Shapefile zip's ``.cpg`` member names, reading at most a few bytes."""
    with zipfile.ZipFile(path) as archive:
        size = archive.getinfo(cpg).file_size
        if size > MAX_CPG_BYTES:
            raise InputDataError(
                f"{describe_source(data_file)}: zip member {cpg!r} inflates to {size:,} bytes; a "
                f".cpg names a code page in a few bytes (e.g. 'UTF-8'), at most {MAX_CPG_BYTES}: "
                "replace it, or drop it and declare 'encoding' in the manifest")
        with archive.open(cpg) as member:
            return member.read(MAX_CPG_BYTES).decode("ascii", "replace").strip()


def _csv_options(data_file: DataFile, where: str, info: dict) -> tuple[tuple[str, str], ...]:
    spec = data_file.csv
    assert spec is not None  # the manifest model requires it for csv
    columns = [str(c) for c in info.get("fields", [])]
    wanted = [spec.wkt_column] if spec.wkt_column else [spec.x_column, spec.y_column]
    missing = [name for name in wanted if name not in columns]
    if missing:
        named = " or ".join(repr(name) for name in missing)
        raise InputDataError(f"{where}: the CSV has no column {named}; its columns are "
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
    check_declared_format(path, data_file)
    gdal_path = gdal_path_for(path, data_file)
    lock_down_gdal()
    try:
        listing = pyogrio.list_layers(gdal_path)
    except GDAL_ERRORS as exc:
        raise InputDataError(
            f"{describe_source(data_file)} cannot be read as {data_file.format.value}: GDAL says "
            f"{_gdal_says(exc, data_file, gdal_path, path)} (the file looks like "
            f"{describe_content(path)})") from None
    return [str(name) for name, geometry_type in listing if geometry_type is not None]


def _add_source(plan: dict[str, list[LayerSource]], layer: str, source: LayerSource) -> None:
    """``source`` feeds ``layer``, or with geometry_families 'split' the layers
    ``<layer>_points``, ``_lines`` and ``_polygons``, each taking its family's rows."""
    if source.data_file.geometry_families != "split":
        plan.setdefault(layer, []).append(source)
        return
    for suffix, family in zip(FAMILY_SUFFIXES, ("point", "line", "polygon"), strict=True):
        plan.setdefault(f"{layer}_{suffix}", []).append(replace(source, family=family))


def plan_layers(files: list[tuple[Path, DataFile]],
                limits: ShardLimits | None = None) -> dict[str, list[LayerSource]]:
    """Group landed files by the layer they feed, checking every file before any is sharded.

    ``all_layers`` files feed one layer per spatial source layer, named
    ``<layer>_<normalised source layer name>``; layer order is first appearance. Checked here,
    without reading features: zip safety, the driver GDAL detects against the declared format,
    that named layers and CSV columns exist, and each layer's CRS. Every file is checked
    before raising: the error lists each problem found (the first ``MAX_LISTED_FILE_PROBLEMS``).
    """
    limits = limits or ShardLimits()
    plan: dict[str, list[LayerSource]] = {}
    problems: list[str] = []  # every file is checked: one run lists every unusable file
    for path, data_file in files:
        try:
            _plan_file(plan, path, data_file, limits)
        except InputDataError as exc:
            problems.append(str(exc))
    for layer, sources in plan.items():
        try:
            layer_crs(layer, sources, [s.probe for s in sources])
        except InputDataError as exc:
            problems.append(str(exc))
    if len(problems) == 1:
        raise InputDataError(problems[0])
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED_FILE_PROBLEMS])
        more = len(problems) - MAX_LISTED_FILE_PROBLEMS
        raise InputDataError(f"{len(problems)} problems with the landed files:\n{listed}"
                             + (f"\n  ... and {more} more" if more > 0 else ""))
    return plan


def _plan_file(plan: dict[str, list[LayerSource]], path: Path, data_file: DataFile,
               limits: ShardLimits) -> None:
    """Add the sources ``data_file`` feeds to ``plan`` (checked; nothing read)."""
    if not data_file.all_layers:
        probe = probe_source(path, data_file, data_file.source_layer, limits)
        _add_source(plan, data_file.layer, LayerSource(path, data_file,
                                                       data_file.source_layer, probe))
        return
    names = _source_layers(path, data_file, limits)
    if not names:
        raise InputDataError(f"{describe_source(data_file)} has no spatial layers; expected at least "
                             "one layer with a geometry column")
    produced: dict[str, str] = {}
    for name in names:
        layer = _expanded_layer_name(data_file.layer, name, data_file)
        if layer in produced:
            raise InputDataError(
                f"{describe_source(data_file)}: source layers {produced[layer]!r} and {name!r} both "
                f"become layer {layer!r}; rename one of them in the file"
            )
        produced[layer] = name
        source_layer = None if data_file.format is InputFormat.GEOPARQUET else name
        probe = probe_source(path, data_file, source_layer, limits)
        _add_source(plan, layer, LayerSource(path, data_file, source_layer, probe))

