"""CRS checks: each source against the manifest's ``source_crs``, one CRS per layer, and the
CRS text the chunk index records."""

from __future__ import annotations

import json

from pyproj import CRS

from libs.errors import InputDataError
from libs.manifest import InputFormat
from libs.sharding.sources import LayerSource, SourceProbe, describe_source


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


def crs_text(crs: CRS) -> str:
    """How the chunk index records a CRS: ``EPSG:3857``-style when it has an authority code,
    else WKT."""
    authority = crs.to_authority(min_confidence=90)
    return ":".join(authority) if authority else crs.to_wkt()


def layer_crs(layer: str, sources: list[LayerSource], probes: list[SourceProbe]) -> CRS:
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


def _effective_crs(source: LayerSource, probe: SourceProbe, layer: str) -> CRS:
    where = describe_source(source.data_file, layer, source.source_layer)
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
