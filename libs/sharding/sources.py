"""What feeds a layer: :class:`LayerSource`, what probing it found, and how messages name it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pyogrio.errors import (
    CRSError,
    DataLayerError,
    DataSourceError,
    FeatureError,
    FieldError,
    GeometryError,
)

from libs.manifest import DataFile, InputFormat

#: What pyogrio raises for a file GDAL cannot read (it also lets some plain errors through).
GDAL_ERRORS = (DataSourceError, DataLayerError, CRSError, FeatureError, FieldError, GeometryError,
                RuntimeError, ValueError, IndexError)
#: Formats that store text in a declared encoding (transcoded to UTF-8 before GDAL reads them).
TEXT_FORMATS = {InputFormat.CSV, InputFormat.GEOJSON, InputFormat.GEOJSONSEQ}


@dataclass(frozen=True)
class SourceProbe:
    """What a first look at a source found (driver, CRS, how to open it), before any row is
    read: made by ``inputs.probe_source``, used to check the CRS and to open the reader."""

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
    probe: SourceProbe | None = field(default=None, repr=False, compare=False)
    #: geometry_families 'split': the one family this layer takes ('point', 'line', 'polygon')
    family: str | None = None


def row_label(data_file: DataFile, number: int) -> str:
    """How messages name a row, counting from 1: ``data line 3`` of a CSV (the third row after
    the header; a quoted value spanning lines still counts once), ``row 3`` (the third
    feature) of any other format."""
    return f"data line {number}" if data_file.format is InputFormat.CSV else f"row {number}"


def describe_source(data_file: DataFile, layer: str | None = None,
                    source_layer: str | None = None) -> str:
    """How messages name a source: ``file 'a.gpkg' (source layer 'roads', layer 'base_roads')``."""
    inner = f"source layer {source_layer!r}, " if source_layer else ""
    return f"file {data_file.path!r} ({inner}layer {layer or data_file.layer!r})"
