"""The whole pipeline, ours against its peers, on the same landed files in the same run.

Each case runs ``benchmarks/pipelines.py`` in a fresh interpreter (see there for what every
pipeline does): imports and input preparation happen before timing, the timed part runs from
"go" to the child's "timed" report, and a background thread samples the peak RSS of every
process involved meanwhile (``benchmarks/rss.py``). Correctness is checked after timing: every
pipeline's row counts per layer equal the input's, and the join totals (points counted, sum
of ``value``) are equal across pipelines at each size.

Inputs per size N: N points, N/10 lines, N/10 polygons (seeded, FlatGeobuf, EPSG:3857,
``benchmarks/conftest.py``) and the 177 Natural Earth countries from pyogrio's fixtures.

Environment: ``BENCH_PIPELINE_SIZES`` (default ``100000,1000000,10000000``),
``BENCH_PIPELINES`` (default all: ours, ogr2ogr, geopandas, dask_geopandas, sedonadb),
``BENCH_PIPELINE_ROUNDS`` (default 1; the best round counts). Needs the local stack.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from benchmarks import summary
from benchmarks.conftest import (
    REPO,
    bench_data_dir,
    lines_flatgeobuf,
    points_flatgeobuf,
    polygons_flatgeobuf,
)
from benchmarks.rss import ProcessTreeSampler
from devstack.envfile import read_env_file
from devstack.layout import ENV_FILE

SIZES = [int(s) for s in os.environ.get("BENCH_PIPELINE_SIZES", "100000,1000000,10000000").split(",")]
PIPELINES = os.environ.get("BENCH_PIPELINES", "ours,ogr2ogr,geopandas,dask_geopandas,sedonadb").split(",")
ROUNDS = int(os.environ.get("BENCH_PIPELINE_ROUNDS", "1"))
COUNTRIES = 177
READY_TIMEOUT_S = 1800  # landing 10M points into the object store is not quick
RUN_TIMEOUT_S = 3600
_checks: dict[int, dict[str, dict]] = {}


def batch_inputs(size: int) -> dict:
    """The batch's files, generated (and cached) before any timing."""
    from libs.sample_batch import natural_earth_countries_zip

    countries = bench_data_dir() / "countries.zip"
    if not countries.exists():
        natural_earth_countries_zip(countries)
    layers = {"points": points_flatgeobuf(size), "lines": lines_flatgeobuf(size // 10),
              "polygons": polygons_flatgeobuf(size // 10)}
    return {"size": size, "layers": {k: str(v) for k, v in layers.items()}, "countries": str(countries),
            "input_bytes": sum(p.stat().st_size for p in layers.values()) + countries.stat().st_size,
            "features": size + 2 * (size // 10) + COUNTRIES}


class Child:
    """One pipeline process and its line protocol."""

    def __init__(self, pipeline: str, spec: dict, log: Path):
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.pipelines", pipeline, json.dumps(spec)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("BENCH "):
                self.events.put(json.loads(line[6:]))
        self.events.put({"event": "exit"})

    def expect(self, event: str, timeout_s: float) -> dict:
        try:
            message = self.events.get(timeout=timeout_s)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError(f"no {event!r} from the child within {timeout_s}s; "
                                 f"log: {self.log.name}") from None
        assert message["event"] == event, (f"expected {event!r}, got {message}; the child's log: "
                                           f"{self.log.name}")
        return message

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        assert self.proc.wait(timeout=600) == 0, f"the child failed; log: {self.log.name}"
        self.log.close()


@pytest.fixture(scope="module")
def stack():
    if not ENV_FILE.exists():
        pytest.skip("the pipeline benchmarks need the local stack: python -m devstack up")
    return read_env_file(ENV_FILE)


@pytest.mark.benchmark(group="pipeline")
@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("size", SIZES, ids=summary.size_label)
def test_pipeline(benchmark, stack, tmp_path, size, pipeline):
    if pipeline == "sedonadb":
        pytest.importorskip("sedonadb", reason="the SedonaDB peer needs requirements-bench.txt")
    inputs = batch_inputs(size)
    spec = dict(inputs)
    rounds: list[dict] = []
    children: list[Child] = []

    def setup():
        out = tmp_path / f"round-{len(children)}"
        out.mkdir()
        child = Child(pipeline, {**spec, "out": str(out)}, tmp_path / f"{pipeline}-{len(children)}.log")
        children.append(child)
        ready = child.expect("ready", READY_TIMEOUT_S)
        return (child, ready), {}

    def timed(child: Child, ready: dict) -> None:
        with ProcessTreeSampler(child.proc.pid, postgres_port=int(stack["POSTGRES_PORT"]),
                                ray_job_id=ready.get("ray_job_id")) as sampler:
            started = time.perf_counter()
            child.go()
            message = child.expect("timed", RUN_TIMEOUT_S)
            seconds = time.perf_counter() - started
        rounds.append({"seconds": seconds, "stages": message["stages"], "peak": sampler.peak})

    benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, iterations=1)
    checks = []
    for child in children:
        checks.append(child.expect("check", 600)["check"])
        child.finish()
    expected_rows = {"points": size, "lines": size // 10, "polygons": size // 10, "countries": COUNTRIES}
    for check in checks:
        assert check["rows"] == expected_rows, (pipeline, check)
        assert check["join_rows"] == COUNTRIES, (pipeline, check)
    _checks.setdefault(size, {})[pipeline] = checks[0]

    best = min(rounds, key=lambda r: r["seconds"])
    peak = max(r["peak"].total_mib for r in rounds)
    parts = max(rounds, key=lambda r: r["peak"].total_mib)["peak"].parts_mib
    pss = max(rounds, key=lambda r: r["peak"].pss_mib)["peak"]
    result = summary.CaseResult(
        pipeline=pipeline, size=size, features=inputs["features"], input_bytes=inputs["input_bytes"],
        seconds=best["seconds"], stages={k: v for k, v in best["stages"].items() if k in summary.STAGES},
        peak_rss_mib=round(peak, 1), rss_parts_mib=parts, check=checks[0],
        peak_pss_mib=round(pss.pss_mib, 1) or None, pss_parts_mib=pss.pss_parts_mib)
    summary.record_case(result)
    benchmark.extra_info.update(features=inputs["features"], features_per_s=round(result.features_per_s),
                                mb_per_s=round(result.mb_per_s, 2), peak_rss_mib=result.peak_rss_mib,
                                rss_parts_mib=parts, peak_pss_mib=result.peak_pss_mib,
                                pss_parts_mib=pss.pss_parts_mib, stages=best["stages"],
                                check=checks[0])


@pytest.mark.parametrize("size", SIZES, ids=summary.size_label)
def test_pipelines_agree(size):
    """Same join totals from every pipeline that ran at this size (after all the timing)."""
    checks = _checks.get(size, {})
    if len(checks) < 2:
        pytest.skip(f"fewer than two pipelines ran at {size}")
    counts = {name: c["point_count"] for name, c in checks.items()}
    sums = {name: c["value_sum"] for name, c in checks.items()}
    assert len(set(counts.values())) == 1, f"points counted per country differ: {counts}"
    reference = next(iter(sums.values()))
    assert all(abs(v - reference) <= 1e-6 * max(1.0, abs(reference)) for v in sums.values()), sums
