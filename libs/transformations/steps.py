"""Recipe steps: pure functions from one chunk (a GeoDataFrame) to another."""

from __future__ import annotations

import geopandas as gpd
import shapely
from pyproj import CRS

from libs.errors import TransformError


def reproject(frame: gpd.GeoDataFrame, target_crs: str) -> gpd.GeoDataFrame:
    """Reproject to ``target_crs``; a chunk already in that CRS is returned unchanged."""
    if frame.crs is None:
        raise TransformError("cannot reproject a chunk without a CRS; set source_crs in the manifest")
    target = CRS.from_user_input(target_crs)
    if frame.crs.equals(target):
        return frame
    projected = frame.to_crs(target)
    coords = shapely.get_coordinates(projected.geometry.values)
    if coords.size and not (abs(coords) < float("inf")).all():
        raise TransformError(
            f"reprojecting from {frame.crs.name!r} to {target.name!r} produced infinite "
            "coordinates: some features lie outside the target CRS's area of use"
        )
    return projected


def make_valid(frame: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Repair invalid geometries with GEOS make_valid (structure method, keeps collapsed parts)."""
    geoms = frame.geometry.values
    invalid = ~shapely.is_valid(geoms) & ~shapely.is_missing(geoms)
    if not invalid.any():
        return frame
    repaired = geoms.copy()
    repaired[invalid] = shapely.make_valid(geoms[invalid])
    out = frame.copy()
    out[frame.geometry.name] = gpd.GeoSeries(repaired, crs=frame.crs, index=frame.index)
    return out
