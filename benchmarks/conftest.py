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
from pyogrio.raw import write_arrow
from pyproj import Transformer

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
        records = np.zeros((size, 21), dtype=np.uint8)
        records[:, 0] = 1  # little endian
        records[:, 1] = 1  # wkbPoint
        records[:, 5:21] = np.column_stack([x, y]).astype("<f8").view(np.uint8)
        offsets = pa.py_buffer((np.arange(size + 1, dtype=np.int32) * 21).tobytes())
        wkb = pa.Array.from_buffers(pa.binary(), size, [None, offsets, pa.py_buffer(records.tobytes())])
        yield pa.RecordBatch.from_arrays(
            [pa.array(np.arange(start, start + size, dtype=np.int64)),
             pa.array(np.round(rng.gamma(2.0, 50.0, size), 3)),
             pa.array(rng.choice(categories, size)), wkb],
            names=["point_id", "value", "category", "geometry"])


def points_flatgeobuf(n: int, seed: int = 42) -> Path:
    """An ``n``-point FlatGeobuf (EPSG:3857), generated once and cached."""
    path = bench_data_dir() / f"points-{n}-seed{seed}.fgb"
    if path.exists():
        return path
    batches = _point_batches(n, seed)
    first = next(batches)
    reader = pa.RecordBatchReader.from_batches(first.schema, (b for part in ([first], batches)
                                                              for b in part))
    partial = path.with_suffix(".partial.fgb")
    write_arrow(reader, partial, driver="FlatGeobuf", geometry_name="geometry",
                geometry_type="Point", crs="EPSG:3857", layer_options={"SPATIAL_INDEX": "NO"})
    partial.rename(path)
    return path


@pytest.fixture(scope="session")
def points_file() -> Callable[[int], Path]:
    """Factory: the cached ``n``-point FlatGeobuf."""
    return points_flatgeobuf
