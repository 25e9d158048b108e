"""The pipeline's Ray application metrics (throughput per stage, batch and layer) and the
matching progress line each stage writes to the Dagster log.

Four counters, each tagged ``stage``, ``batch_id`` and ``layer``: ``spatial_etl_features``
(rows a stage processed), ``spatial_etl_bytes`` (GeoParquet written, or read by the load),
``spatial_etl_rejects`` (rows set aside with a reason) and ``spatial_etl_chunks``. Ray
exports them as Prometheus counters ``ray_<name>_total``. The transform records inside its
Ray tasks (``etl_pipelines.ray.tasks``), on the node that ran them; the other stages record
in the run process, only while it is connected to Ray. They are for watching throughput, not
bookkeeping: the counts that must reconcile are in the Dagster metadata and the ledger.
Where each is recorded, the queries and the known over-counts: docs/ray-metrics.md.

Progress lines (``StageProgress``) have one shape for every stage:
``<stage> <done>/<total> chunks, <rows> rows, <features/s> features/s`` (``?`` for a total
not known yet: the shard streams chunks out before it has counted them).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

FEATURES = "spatial_etl_features"
BYTES = "spatial_etl_bytes"
REJECTS = "spatial_etl_rejects"
CHUNKS = "spatial_etl_chunks"
TAG_KEYS = ("stage", "batch_id", "layer")
STAGES = ("shard", "transform", "load", "join", "publish")

_DESCRIPTIONS = {
    FEATURES: "features (rows) processed, per stage, batch and layer",
    BYTES: "GeoParquet bytes written (read, for load), per stage, batch and layer",
    REJECTS: "rows rejected with a reason, per stage, batch and layer",
    CHUNKS: "chunks or staged objects finished, per stage, batch and layer",
}


def prometheus_name(metric: str) -> str:
    """The name Ray 2.60 exports ``metric`` under (a counter: ``ray_`` prefix, ``_total``)."""
    return f"ray_{metric}_total"


# One set of Counter objects per process (a driver or a Ray worker); created on first use.
_counters: dict[str, Any] = {}


def _counter(name: str) -> Any:
    if name not in _counters:
        from ray.util.metrics import Counter

        _counters[name] = Counter(name, description=_DESCRIPTIONS[name], tag_keys=TAG_KEYS)
    return _counters[name]


def connected_to_ray() -> bool:
    """True if this process has a Ray connection (never imports Ray just to find out)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def record_stage(stage: str, batch_id: str, layer: str, *, features: int = 0, bytes_: int = 0,
                 rejects: int = 0, chunks: int = 0) -> bool:
    """Add to the four counters; returns False (and records nothing) without a Ray connection.

    Zero amounts are skipped (a Ray counter only takes positive increments).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if not connected_to_ray():
        return False
    tags = {"stage": stage, "batch_id": batch_id, "layer": layer}
    for name, amount in ((FEATURES, features), (BYTES, bytes_), (REJECTS, rejects),
                         (CHUNKS, chunks)):
        if amount > 0:
            _counter(name).inc(amount, tags=tags)
    return True


class StageProgress:
    """Counts a stage's finished chunks, logs the progress line and records the counters.

    Thread-safe: the loader reports chunks from its worker threads. ``started`` (a
    ``time.monotonic()`` value; default now) is when the stage's work began, for the rate.
    """

    def __init__(self, log: Callable[[str], None], stage: str, batch_id: str,
                 total: int | None, *, record: bool = True,
                 started: float | None = None) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self._log = log
        self.stage = stage
        self.batch_id = batch_id
        self.total = total
        self._record = record
        self.done = 0
        self.rows = 0
        self.started = time.monotonic() if started is None else started
        self._lock = threading.Lock()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    @property
    def features_per_second(self) -> float:
        seconds = self.seconds
        return self.rows / seconds if seconds > 0 else 0.0

    def line(self) -> str:
        total = "?" if self.total is None else str(self.total)
        return (f"{self.stage} {self.done}/{total} chunks, {self.rows:,} rows, "
                f"{self.features_per_second:,.0f} features/s")

    def chunk_done(self, layer: str, *, rows: int, bytes_: int = 0, rejects: int = 0,
                   chunks: int = 1, features: int | None = None, detail: str = "") -> str:
        """Count ``chunks`` finished chunks of ``layer`` holding ``rows`` rows, record them as
        ``features`` (default: ``rows``) unless the stage records elsewhere (inside its Ray
        tasks), and log the progress line."""
        with self._lock:
            self.done += chunks
            self.rows += rows
            if self._record:
                record_stage(self.stage, self.batch_id, layer,
                             features=rows if features is None else features, bytes_=bytes_,
                             rejects=rejects, chunks=chunks)
            line = self.line() + (f" ({detail})" if detail else "")
            self._log(line)
        return line
