"""Shared benchmark inputs, materialised before any timing and cached between runs.

Inputs live under ``BENCH_DATA_DIR`` (default ``.state/bench-data``, git-ignored) and are
keyed by what they contain, so a 10M-point file is generated once per machine. Sizes are
overridable from the environment so CI can run the same cases small:

    BENCH_POINTS=100000 BENCH_POINTS_LARGE=1000000 .venv/bin/pytest benchmarks/bench_shard.py
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import shapely
from pyogrio.raw import write_arrow
from pyproj import Transformer

from benchmarks import summary
from libs.geoparquet import geometries_to_wkb

REPO = Path(__file__).resolve().parents[1]
BENCH_POINTS = int(os.environ.get("BENCH_POINTS", "1000000"))
BENCH_POINTS_LARGE = int(os.environ.get("BENCH_POINTS_LARGE", "10000000"))
_GENERATE_BATCH = 1_000_000


def bench_data_dir() -> Path:
    folder = Path(os.environ.get("BENCH_DATA_DIR", REPO / ".state" / "bench-data"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _point_batches(n: int, seed: int) -> Iterator[pa.RecordBatch]:
    """Batches shaped like ``libs.sample_batch.synthetic_points`` (EPSG:3857), made in bounded memory."""
    rng = np.random.default_rng(seed)
    to_mercator = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    categories = np.array(["a", "b", "c"])
    for start in range(0, n, _GENERATE_BATCH):
        size = min(_GENERATE_BATCH, n - start)
        x, y = to_mercator.transform(rng.uniform(-180.0, 180.0, size), rng.uniform(-60.0, 75.0, size))
        wkb = geometries_to_wkb(shapely.points(x, y), points=True)
        yield pa.RecordBatch.from_arrays(
            [pa.array(np.arange(start, start + size, dtype=np.int64)),
             pa.array(np.round(rng.gamma(2.0, 50.0, size), 3)),
             pa.array(rng.choice(categories, size)), wkb],
            names=["point_id", "value", "category", "geometry"])


def _shape_batches(n: int, seed: int, kind: str) -> Iterator[pa.RecordBatch]:
    """Small seeded lines (3 vertices) or polygons (closed 5-vertex rings: squares with one
    corner jittered, always valid) around random centres, in EPSG:3857, with the points'
    attributes."""
    rng = np.random.default_rng(seed)
    to_mercator = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    categories = np.array(["a", "b", "c"])
    for start in range(0, n, _GENERATE_BATCH):
        size = min(_GENERATE_BATCH, n - start)
        x, y = to_mercator.transform(rng.uniform(-180.0, 180.0, size), rng.uniform(-60.0, 75.0, size))
        half = rng.uniform(200.0, 2000.0, size)[:, None]
        if kind == "lines":
            dx = rng.uniform(-1.0, 1.0, (size, 3)) * half
            dy = rng.uniform(-1.0, 1.0, (size, 3)) * half
            coords = np.stack([x[:, None] + dx, y[:, None] + dy], axis=-1)
            geometry = shapely.linestrings(coords.reshape(-1, 2), indices=np.repeat(np.arange(size), 3))
        else:
            corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1], [-1, -1]], dtype=float)
            ring = corners[None, :, :] * half[:, :, None]
            ring[:, 2, :] *= rng.uniform(0.5, 1.0, (size, 1))  # a convex quadrilateral
            ring += np.stack([x, y], axis=-1)[:, None, :]
            geometry = shapely.polygons(shapely.linearrings(ring.reshape(-1, 2),
                                                            indices=np.repeat(np.arange(size), 5)))
        yield pa.RecordBatch.from_arrays(
            [pa.array(np.arange(start, start + size, dtype=np.int64)),
             pa.array(np.round(rng.gamma(2.0, 50.0, size), 3)),
             pa.array(rng.choice(categories, size)),
             pa.array(shapely.to_wkb(geometry), pa.binary())],
            names=[f"{kind[:-1]}_id", "value", "category", "geometry"])


def _cached_flatgeobuf(path: Path, batches: Iterator[pa.RecordBatch], geometry_type: str) -> Path:
    if path.exists():
        return path
    first = next(batches)
    reader = pa.RecordBatchReader.from_batches(first.schema, (b for part in ([first], batches)
                                                              for b in part))
    partial = path.with_suffix(".partial.fgb")
    write_arrow(reader, partial, driver="FlatGeobuf", geometry_name="geometry",
                geometry_type=geometry_type, crs="EPSG:3857", layer_options={"SPATIAL_INDEX": "NO"})
    partial.rename(path)
    return path


def points_flatgeobuf(n: int, seed: int = 42) -> Path:
    """An ``n``-point FlatGeobuf (EPSG:3857), generated once and cached."""
    path = bench_data_dir() / f"points-{n}-seed{seed}.fgb"
    return _cached_flatgeobuf(path, _point_batches(n, seed), "Point")


def lines_flatgeobuf(n: int, seed: int = 43) -> Path:
    """``n`` seeded 3-vertex lines (EPSG:3857), generated once and cached."""
    path = bench_data_dir() / f"lines-{n}-seed{seed}.fgb"
    return _cached_flatgeobuf(path, _shape_batches(n, seed, "lines"), "LineString")


def polygons_flatgeobuf(n: int, seed: int = 44) -> Path:
    """``n`` seeded small quadrilaterals (EPSG:3857), generated once and cached."""
    path = bench_data_dir() / f"polygons-{n}-seed{seed}.fgb"
    return _cached_flatgeobuf(path, _shape_batches(n, seed, "polygons"), "Polygon")


@pytest.fixture(scope="session")
def points_file() -> Callable[[int], Path]:
    """Factory: the cached ``n``-point FlatGeobuf."""
    return points_flatgeobuf


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the summary table (cases, throughput, RSS, ratios, targets) and write it, with
    the chart, under ``BENCH_OUT_DIR`` (default ``.state/bench``)."""
    if not summary.has_results():
        return
    out_dir = Path(os.environ.get("BENCH_OUT_DIR", REPO / ".state" / "bench"))
    written = summary.write_outputs(out_dir)
    terminalreporter.write_sep("=", "benchmark summary")
    terminalreporter.write_line(summary.render_markdown(summary.collect()))
    terminalreporter.write_line("written: " + ", ".join(str(p) for p in written))
