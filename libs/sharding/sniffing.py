"""What a landed file's bytes are, checked against its declared format before GDAL sees it.

GDAL picks a driver from a file's content, whatever its name or declared format: an OGR VRT
named ``x.geojson`` is opened as a VRT. So each landed file's first bytes are checked here
first (GeoJSON text, the SQLite header and GeoPackage application_id, the FlatGeobuf magic, a
zip whose ``.shp`` member has the Shapefile magic, plain text for CSV); a file that is not
what the manifest says is refused with an error naming it, the declared format and what the
bytes look like (e.g. "an XML document (OGR VRT)"). Only a bounded head is ever read.
"""

from __future__ import annotations

import codecs
import struct
import zipfile
from pathlib import Path

from libs.errors import InputDataError
from libs.manifest import DataFile, InputFormat
from libs.sharding.sources import TEXT_FORMATS, describe_source

#: Bytes of a file's head looked at.
HEAD_BYTES = 4096
_SQLITE = b"SQLite format 3\x00"
#: GeoPackage ``application_id`` values (1.2+, and 1.0/1.1's "GP10"/"GP11").
GPKG_APPLICATION_IDS = (b"GPKG", b"GP10", b"GP11")
_FGB_MAGIC = b"fgb\x03fgb"  # "fgb", major version 3, "fgb", patch
_SHAPEFILE_MAGIC = struct.pack(">i", 9994)
_XML_KINDS = (("<OGRVRTDataSource", "OGR VRT"), ("<VRTDataset", "GDAL VRT"),
              ("<GDAL_WMS", "GDAL WMS"), ("<GDAL_WMTS", "GDAL WMTS"),
              ("<WFS_GetCapabilities", "WFS"), ("<kml", "KML"), ("<gpx", "GPX"),
              ("<svg", "SVG"))
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))


def _head(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.read(HEAD_BYTES)


def _text(head: bytes, encoding: str | None) -> str | None:
    """The head as text (a BOM decides the codec, else ``encoding`` or UTF-8), or None when
    it holds control characters (binary data)."""
    codec = next((name for bom, name in _BOMS if head.startswith(bom)), encoding or "utf-8")
    try:
        # undecodable bytes are replaced: the reader reports them with their row and column
        text = codecs.getincrementaldecoder(codec)(errors="replace").decode(head, final=False)
    except LookupError:
        return None
    if "\x00" in text or any(ord(c) < 32 and c not in "\t\r\n\x0c\x1e" for c in text):
        return None  # control characters: binary data, not text
    return text.lstrip("\ufeff")


def describe_content(path: Path, encoding: str | None = None) -> str:
    """What the bytes of ``path`` look like, for messages: "an XML document (OGR VRT)"."""
    try:
        head = _head(path)
    except OSError:
        return "an unreadable file"
    if not head:
        return "an empty file"
    for magic, what in ((b"PAR1", "a Parquet file"), (b"PK\x03\x04", "a zip archive"),
                        (b"PK\x05\x06", "an empty zip archive"), (_FGB_MAGIC, "a FlatGeobuf file"),
                        (_SHAPEFILE_MAGIC, "a bare Shapefile .shp (not zipped)")):
        if head.startswith(magic):
            return what
    if head.startswith(_SQLITE):
        application_id = head[68:72]
        if application_id in GPKG_APPLICATION_IDS:
            return "a GeoPackage"
        return f"an SQLite database that is not a GeoPackage (application_id {application_id!r})"
    text = _text(head, encoding)
    if text is None:
        return "binary data"
    start = text.lstrip(" \t\r\n\x1e")
    if start.startswith("<"):
        kind = next((name for tag, name in _XML_KINDS if tag.lower() in start.lower()), None)
        return f"an XML document ({kind})" if kind else "an XML document"
    if start.startswith("{"):
        return "JSON text"
    if start.startswith("["):
        return "a JSON array (not a GeoJSON object)"
    if not start:
        return "blank text"
    return "text"


def _refuse(data_file: DataFile, found: str, expected: str) -> InputDataError:
    return InputDataError(
        f"{describe_source(data_file)}: declared {data_file.format.value} but its bytes are "
        f"{found}, not {expected}; land the file the manifest declares or fix its 'format'")


def check_declared_format(path: Path, data_file: DataFile) -> None:
    """Refuse ``path`` unless its bytes are what ``data_file.format`` declares.

    GeoParquet is left to pyarrow (it never reaches GDAL); a Shapefile zip's ``.shp``
    members are checked by :func:`check_shapefile_member` once the zip itself is checked.
    """
    fmt = data_file.format
    if fmt is InputFormat.GEOPARQUET:
        return
    found = describe_content(path, data_file.encoding if fmt in TEXT_FORMATS else None)
    head = _head(path)
    if fmt in (InputFormat.GEOJSON, InputFormat.GEOJSONSEQ):
        if found != "JSON text":
            raise _refuse(data_file, found, "JSON text starting with '{'")
    elif fmt is InputFormat.GPKG:
        if found != "a GeoPackage":
            raise _refuse(data_file, found, "a GeoPackage (SQLite with application_id 'GPKG')")
    elif fmt is InputFormat.FLATGEOBUF:
        if not head.startswith(_FGB_MAGIC):
            raise _refuse(data_file, found, "a FlatGeobuf file (magic bytes 'fgb', version 3)")
    elif fmt is InputFormat.SHAPEFILE_ZIP:
        if not head.startswith(b"PK\x03\x04"):
            raise _refuse(data_file, found, "a zip archive holding .shp, .shx and .dbf")
    elif fmt is InputFormat.CSV:
        if found not in ("text", "JSON text", "a JSON array (not a GeoJSON object)"):
            raise _refuse(data_file, found, "CSV text")


def check_shapefile_member(archive: zipfile.ZipFile, member: str, data_file: DataFile) -> None:
    """Refuse a Shapefile zip whose ``member`` (.shp or .shx) lacks the Shapefile magic."""
    with archive.open(member) as handle:
        magic = handle.read(4)
    if magic != _SHAPEFILE_MAGIC:
        raise InputDataError(
            f"{describe_source(data_file)}: zip member {member!r} is not a Shapefile part (its "
            f"first bytes are {magic!r}, expected the Shapefile file code 9994); zip the "
            ".shp, .shx and .dbf the Shapefile was written as")
