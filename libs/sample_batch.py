"""A reproducible sample batch: seeded synthetic points plus real Natural Earth countries.

The countries are the Natural Earth "admin 0 countries" (low resolution, public domain)
shipped inside pyogrio's wheel as a test fixture; the points are generated from a seed, so
the same arguments always give the same files.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio

NATURAL_EARTH_DIR = Path(pyogrio.__file__).parent / "tests" / "fixtures" / "naturalearth_lowres"


def natural_earth_countries_zip(out: Path) -> Path:
    """Zip the shipped Natural Earth shapefile (.shp, .shx, .dbf, .prj, .cpg) into ``out``."""
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for part in sorted(NATURAL_EARTH_DIR.glob("naturalearth_lowres.*")):
            archive.write(part, arcname=f"countries{part.suffix}")
    return out


def synthetic_points(n: int, seed: int) -> gpd.GeoDataFrame:
    """``n`` points over the inhabited latitudes, in EPSG:3857, with id, value and category."""
    rng = np.random.default_rng(seed)
    lon = rng.uniform(-180.0, 180.0, n)
    lat = rng.uniform(-60.0, 75.0, n)
    frame = gpd.GeoDataFrame(
        {
            "point_id": np.arange(n, dtype="int64"),
            "value": np.round(rng.gamma(2.0, 50.0, n), 3),
            "category": rng.choice(np.array(["a", "b", "c"]), n),
        },
        geometry=gpd.points_from_xy(lon, lat),
        crs="EPSG:4326",
    )
    return frame.to_crs("EPSG:3857")


def write_sample_batch(folder: Path, batch_id: str, n_points: int = 100_000,
                       seed: int = 42) -> dict:
    """Write points (FlatGeobuf), countries (zipped Shapefile) and the manifest; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    pyogrio.write_dataframe(synthetic_points(n_points, seed), folder / "points.fgb",
                            driver="FlatGeobuf")
    natural_earth_countries_zip(folder / "countries.zip")
    manifest = {
        "manifest_version": 1,
        "batch_id": batch_id,
        "target_crs": "EPSG:8857",
        "files": [
            {"path": "points.fgb", "layer": "points", "format": "flatgeobuf",
             "source_crs": "EPSG:3857"},
            {"path": "countries.zip", "layer": "countries", "format": "shapefile_zip",
             "source_crs": "EPSG:4326"},
        ],
        "join": {
            "name": "points_per_country",
            "left": "countries",
            "right": "points",
            "predicate": "intersects",
            "how": "left",
            "aggregations": [
                {"function": "count", "output": "point_count"},
                {"function": "sum", "column": "value", "output": "value_sum"},
                {"function": "mean", "column": "value", "output": "value_mean"},
            ],
        },
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
