"""The valid coordinate domain of a CRS, and the checks the reproject step makes against it.

Reprojection alone only catches coordinates PROJ cannot transform (infinite results); a
latitude of 120, a coordinate of 1e300 or a point at 90°N in Web Mercator (2.4e8 m) would
be published as data. So every geometry is checked against its source CRS's domain before
reprojection and against the target CRS's after it, on flat coordinate arrays (numpy, no
per-geometry Python):

- geographic CRS: latitude within ±90, longitude within ±180 plus ``LONGITUDE_TOLERANCE``
  (180°): geometries drawn across the antimeridian continue past ±180 and some data uses
  0..360 longitudes; anything further than one turn is not a longitude;
- projected CRS: its area of use (``CRS.area_of_use``, lon/lat) grown by ``MARGIN_DEGREES``
  (15°) on each side (latitudes up to ±85° only: a Mercator's y runs away towards the pole),
  projected with ``Transformer.transform_bounds``, plus 1% for rounding, and never more than
  the projected area's own width/height beyond it. The margin is generous because national grids
  are routinely used beyond their official zone (all of Norway in UTM 33N); it catches
  1e300, swapped axes or 89° in Web Mercator (3e7 m, the map ends at 85.06°), not data that is merely unusual.
  A CRS without an area of use is only checked for finiteness.

Domains are cached per CRS (by WKT). See docs/coordinate-domain.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import shapely
from pyproj import CRS, Transformer

LONGITUDE_TOLERANCE = 180.0  # degrees beyond ±180 still taken as longitudes
MARGIN_DEGREES = 15.0  # a projected CRS's area of use grown by this (where PROJ can project it)
GROWN_LATITUDE = 85.0  # ...but never its latitudes beyond this
ROUNDING_MARGIN = 0.01  # times the projected box's width/height, on each side
SWAP_FRACTION = 0.5  # more than this share of a chunk's geometries outside -> axes swapped?
SWAP_SLACK = 0.01  # ...and outside by more than this share of the domain's width/height


@dataclass(frozen=True)
class Domain:
    """A box of valid coordinates in a CRS's own units (x east, y north)."""

    minx: float
    miny: float
    maxx: float
    maxy: float
    what: str  # how the box is described to a user

    def outside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per coordinate: outside the box or not finite (NaN compares false: outside)."""
        return ~((x >= self.minx) & (x <= self.maxx) & (y >= self.miny) & (y <= self.maxy))

    def holds(self, x: np.ndarray, y: np.ndarray) -> bool:
        """Whether every (finite) coordinate is inside: four reductions, no temporaries."""
        return not len(x) or bool(x.min() >= self.minx and x.max() <= self.maxx
                                  and y.min() >= self.miny and y.max() <= self.maxy)

    def clip(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The coordinates moved onto the box's edge where they are outside it."""
        return np.clip(x, self.minx, self.maxx), np.clip(y, self.miny, self.maxy)


@lru_cache(maxsize=64)
def _domain(wkt: str) -> Domain | None:
    crs = CRS.from_wkt(wkt)
    if crs.is_geographic:
        # degrees, or whatever angular unit the CRS uses (factor: radians per unit)
        half_turn = math.pi / crs.axis_info[0].unit_conversion_factor
        lon = half_turn + LONGITUDE_TOLERANCE * half_turn / 180
        quarter = half_turn / 2
        return Domain(-lon, -quarter, lon, quarter,
                      f"longitude within ±{lon:g}, latitude within ±{quarter:g}")
    area = crs.area_of_use
    if area is None or not crs.is_projected:
        return None
    west, south, east, north = area.bounds
    # latitudes grow up to 85° only (an area already reaching further keeps its own): a
    # Mercator's y runs away towards the pole
    grown = (max(west - MARGIN_DEGREES, -180.0),
             min(south, max(south - MARGIN_DEGREES, -GROWN_LATITUDE)),
             min(east + MARGIN_DEGREES, 180.0),
             max(north, min(north + MARGIN_DEGREES, GROWN_LATITUDE)))
    base = _projected_box(crs, area.bounds)
    if base is None:
        return None
    # near a projection's singularity (a Mercator's pole) the grown area runs away: never
    # more than the base box's own width/height beyond it
    width, height = base[2] - base[0], base[3] - base[1]
    outer = (base[0] - width, base[1] - height, base[2] + width, base[3] + height)
    box = _projected_box(crs, grown) or base
    minx, miny = max(box[0], outer[0]), max(box[1], outer[1])
    maxx, maxy = min(box[2], outer[2]), min(box[3], outer[3])
    dx, dy = (maxx - minx) * ROUNDING_MARGIN, (maxy - miny) * ROUNDING_MARGIN
    return Domain(minx - dx, miny - dy, maxx + dx, maxy + dy,
                  f"its area of use projected with a margin: x {minx - dx:.6g}..{maxx + dx:.6g}, "
                  f"y {miny - dy:.6g}..{maxy + dy:.6g}")


def _projected_box(crs: CRS, lonlat: tuple[float, float, float, float]
                   ) -> tuple[float, float, float, float] | None:
    """``lonlat`` (WGS 84) projected into ``crs``; None when PROJ cannot (poles, a Mercator's
    latitude 90: infinite), or the area crosses the antimeridian (west > east)."""
    if lonlat[0] >= lonlat[2]:
        return None
    try:
        to_crs = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
        box = to_crs.transform_bounds(*lonlat, densify_pts=21)
    except Exception:  # noqa: BLE001 - PROJ's errors here have no common type
        return None
    if not all(math.isfinite(v) for v in box) or box[0] >= box[2] or box[1] >= box[3]:
        return None
    return box


def domain_of(crs: CRS) -> Domain | None:
    """The valid coordinate box of ``crs``; None when it has none this module can tell."""
    return _domain(crs.to_wkt())


@lru_cache(maxsize=64)
def _geographic_area(wkt: str) -> tuple[float, float, float, float] | None:
    area = CRS.from_wkt(wkt).area_of_use
    return None if area is None else area.bounds


def area_of_use_lonlat(crs: CRS) -> Domain | None:
    """``crs``'s area of use in WGS 84 degrees (for clamping before projecting into it)."""
    bounds = _geographic_area(crs.to_wkt())
    if bounds is None or bounds[0] >= bounds[2]:  # crossing the antimeridian: no clamp
        return None
    return Domain(*bounds, what="area of use")


def outside_rows(bounds: np.ndarray, box: Domain) -> np.ndarray:
    """Per geometry, from its (n, 4) bounds: not entirely inside ``box`` (exact for a box;
    NaN bounds, of NULL and empty geometries too, count as outside: the caller sorts those)."""
    return ~((bounds[:, 0] >= box.minx) & (bounds[:, 2] <= box.maxx)
             & (bounds[:, 1] >= box.miny) & (bounds[:, 3] <= box.maxy))


def first_outside(x: np.ndarray, y: np.ndarray, index: np.ndarray, count: int,
                  domain: Domain) -> tuple[np.ndarray, np.ndarray]:
    """(per geometry: has a coordinate outside ``domain``; per such geometry, in order, the
    position of its first such coordinate) for coordinates ``x, y`` of geometry ``index``."""
    out = domain.outside(x, y)
    rows, first = np.unique(index[out], return_index=True)
    bad = np.zeros(count, dtype=bool)
    bad[rows] = True
    return bad, np.flatnonzero(out)[first]


def swapped(x: np.ndarray, y: np.ndarray, index: np.ndarray, present: int,
            domain: Domain) -> bool:
    """Whether the geometries outside ``domain`` (``x, y``: their coordinates, ``index``:
    0..k-1, which) are most of the ``present`` ones, lie outside by more than ``SWAP_SLACK``
    of it, and every one would be inside with x and y exchanged: axes swapped, not stray
    rows nor polar data a rounding error beyond 90°."""
    if not present or index.size == 0 or index.max() + 1 <= SWAP_FRACTION * present:
        return False
    slack = Domain(*(v + s * SWAP_SLACK for v, s in zip(
        (domain.minx, domain.miny, domain.maxx, domain.maxy),
        (domain.minx - domain.maxx, domain.miny - domain.maxy,
         domain.maxx - domain.minx, domain.maxy - domain.miny), strict=True)), what="")
    far = np.unique(index[slack.outside(x, y)]).size
    return far > SWAP_FRACTION * present and not domain.outside(y, x).any()


def coordinates(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, y and geometry index of every coordinate of ``geoms`` (NULL and empty: none)."""
    xy, index = shapely.get_coordinates(geoms, return_index=True)
    return xy[:, 0], xy[:, 1], index


def clipped(geoms: np.ndarray, domain: Domain) -> np.ndarray:
    """``geoms`` with every coordinate outside ``domain`` moved onto its edge."""
    return shapely.transform(geoms, lambda xy: with_xy(xy, *domain.clip(xy[:, 0], xy[:, 1])),
                             include_z=None)


def with_xy(xyz: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``xyz`` ((n, 2) or (n, 3)) with its first two columns replaced: Z is kept."""
    out = np.array(xyz, dtype=float)
    out[:, 0], out[:, 1] = x, y
    return out
