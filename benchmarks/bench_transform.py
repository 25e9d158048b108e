"""Transform throughput on Ray with 1 and 2 workers (tasks in flight), same chunks, same run.

Needs the local stack (``python -m devstack up``): chunks are read from and written to the
staging bucket exactly as in a pipeline run, one Ray task per chunk. Inputs are staged
before timing; row counts are checked after.
"""

import hashlib
import os
import uuid

import pytest

from benchmarks import summary
from devstack.envfile import read_env_file
from devstack.layout import ENV_FILE
from etl_pipelines.ray.submit import TaskSpec, run_bounded
from libs.descriptors import Chunk
from libs.geoparquet import to_geoparquet_bytes
from libs.manifest.recipe import DEFAULT_RECIPE, effective_recipe
from libs.object_store import ObjectStore, ObjectStoreSettings
from libs.sample_batch import synthetic_points
from libs.transformations import transform_staged_chunk

POINTS = int(os.environ.get("BENCH_TRANSFORM_POINTS", "1000000"))
CHUNKS = int(os.environ.get("BENCH_TRANSFORM_CHUNKS", "8"))
TARGET = "EPSG:8857"
BUCKET = "etl-staging"
_results: dict[int, float] = {}


def _stack_env() -> dict[str, str]:
    if not ENV_FILE.exists():
        pytest.skip("the transform benchmark needs the local stack: python -m devstack up")
    return read_env_file(ENV_FILE)


@pytest.fixture(scope="module")
def staged():
    env = _stack_env()
    for key, value in env.items():
        os.environ.setdefault(key, value)
    import ray

    settings = ObjectStoreSettings(env["MINIO_ENDPOINT"], env["MINIO_ROOT_USER"],
                                   env["MINIO_ROOT_PASSWORD"])
    store = ObjectStore(settings)
    prefix = f"bench/transform-{uuid.uuid4().hex[:8]}/"
    frame = synthetic_points(POINTS, seed=3)
    per_chunk = -(-POINTS // CHUNKS)
    chunks = []
    for ordinal in range(CHUNKS):
        part = frame.iloc[ordinal * per_chunk:(ordinal + 1) * per_chunk]
        data = to_geoparquet_bytes(part)
        key = f"{prefix}chunks/chunk-{ordinal:05d}.parquet"
        store.put_bytes(BUCKET, key, data, "application/vnd.apache.parquet")
        chunks.append(Chunk(key=key, layer="points", ordinal=ordinal,
                            row_offset=ordinal * per_chunk, rows=len(part), bbox=None,
                            crs="EPSG:3857", bytes=len(data),
                            sha256=hashlib.sha256(data).hexdigest()))
    ray.init(address=env["RAY_ADDRESS"], namespace="spatial-etl-bench", log_to_driver=False)
    # warm the workers (imports) so neither case pays for it
    run_bounded(transform_staged_chunk, _tasks(settings, chunks[:2], prefix, "warm"),
                max_in_flight=2, max_retries=0, on_done=lambda *a: None)
    yield settings, chunks, prefix
    ray.shutdown()
    store.delete_prefix(BUCKET, prefix)


def _tasks(settings, chunks, prefix, tag):
    steps = effective_recipe(DEFAULT_RECIPE)
    return [TaskSpec(name=f"bench:{tag}:{c.ordinal}",
                     args=(settings, BUCKET, c, f"{prefix}{tag}/out-{c.ordinal:05d}.parquet",
                           f"{prefix}{tag}/rej-{c.ordinal:05d}.parquet", steps, TARGET))
            for c in chunks]


@pytest.mark.benchmark(group="transform")
@pytest.mark.parametrize("workers", [1, 2])
def test_transform_throughput(benchmark, staged, workers):
    settings, chunks, prefix = staged
    rows_out = []

    def run():
        rows_out.clear()
        run_bounded(transform_staged_chunk, _tasks(settings, chunks, prefix, f"w{workers}"),
                    max_in_flight=workers, max_retries=0,
                    on_done=lambda spec, result, elapsed: rows_out.append(result.chunk.rows))

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    assert sum(rows_out) == POINTS
    features_per_s = POINTS / benchmark.stats.stats.median
    _results[workers] = features_per_s
    benchmark.extra_info["features_per_s"] = round(features_per_s)
    if len(_results) == 2:
        ratio = _results[2] / _results[1]
        benchmark.extra_info["speedup_2_vs_1"] = round(ratio, 3)
        summary.record_ratio("transform_2w_vs_1w", ratio, target=1.7,
                             note=f"{summary.size_label(POINTS)} points, medians")
        print(f"\ntransform: 1 worker {_results[1]:,.0f} features/s, 2 workers "
              f"{_results[2]:,.0f} features/s, speedup {ratio:.2f}x (target >= 1.7x)")
