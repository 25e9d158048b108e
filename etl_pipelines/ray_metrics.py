"""The pipeline's Ray application metrics (throughput per stage, batch and layer) and the
matching progress line each stage writes to the Dagster log.

Four counters, each tagged ``stage``, ``batch_id`` and ``layer`` (the Grafana dashboard and
the Prometheus queries in ray_cluster/monitoring use these names):

==========================  ================================================================
``spatial_etl_features``    features (rows) a stage processed
``spatial_etl_bytes``       bytes of GeoParquet a stage wrote (shard, transform, join,
                            publish) or read (load)
``spatial_etl_rejects``     rows a stage set aside with a reason (transform; publish counts
                            the rows of each ``*_rejects`` dataset here)
``spatial_etl_chunks``      chunks (or staged objects) a stage finished
==========================  ================================================================

Stages: ``shard``, ``transform``, ``load``, ``join``, ``publish``; ``layer`` is the manifest
layer, or the join's name for ``join`` and the dataset's for ``publish``.

Ray exports them through each node's metrics agent (``--metrics-export-port``) as Prometheus
counters named ``ray_<name>_total`` (e.g. ``ray_spatial_etl_features_total``), one series
per recording process (label ``WorkerId``), so a query sums over it:
``sum by (stage, layer) (rate(ray_spatial_etl_features_total{batch_id="..."}[1m]))``.

Where they are recorded:

- transform: inside each Ray task, after ``libs.transformations.transform_staged_chunk``
  returns (``transform_chunk_with_metrics`` is the task; libs stays free of Ray), on the node
  that ran it;
- shard, load, join, publish: in the Dagster run process, *only when it is connected to Ray*
  (``ray.is_initialized()``). The job runs in-process, so a normal run initialises the Ray
  resource before its first step and every stage records; a re-execution of steps that do
  not need Ray (e.g. only ``publish_batch``) does not connect to Ray just to count, and
  records nothing for those steps (their Dagster metadata still has the counts).

Progress lines (``StageProgress``) have one shape for every stage, so a person (or a grep)
reads them alike: ``<stage> <done>/<total> chunks, <rows> rows, <features/s> features/s``,
with ``?`` for a total not known yet (sharding streams chunks out before it has counted them).

The counters are for watching throughput, not for bookkeeping: a task retried after its
node died may count twice, and a node killed before its agent was scraped loses its part.
And in Ray 2.60 a process that connects again after ``ray.shutdown()`` exports each later
increment once per earlier connection (a metric reader leaks per ``ray.init``): harmless for
runs launched one process each (Dagster's run launchers), wrong for many
``execute_in_process`` runs in one process (tests, notebooks) -- the driver-side stages
over-count there; the transform counts, recorded in Ray's worker processes, do not.
The counts that must reconcile are in the Dagster metadata and the ledger.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from libs.descriptors import Chunk, TransformedChunk
from libs.object_store import ObjectStoreSettings
from libs.transformations import transform_staged_chunk

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


def transform_chunk_with_metrics(
    batch_id: str, settings: ObjectStoreSettings, bucket: str, chunk: Chunk, out_key: str,
    rejects_key: str, steps: Sequence[Any], target_crs: str,
) -> TransformedChunk:
    """The transform Ray task: ``transform_staged_chunk`` and then this chunk's counts."""
    result = transform_staged_chunk(settings, bucket, chunk, out_key, rejects_key, steps,
                                    target_crs)
    rejected = result.rejects.rows if result.rejects is not None else 0
    written = result.chunk.bytes + (result.rejects.bytes if result.rejects is not None else 0)
    record_stage("transform", batch_id, chunk.layer, features=result.rows_in, bytes_=written,
                 rejects=rejected, chunks=1)
    # no release_memory() here: the worker's next chunk reuses these pages, and fresh ones
    # cost it ~10% more CPU (more on a VM that hands freed pages back to its host); the op
    # ends the idle workers once the stage's last chunk is done (retire_workers)
    return result


class StageProgress:
    """Counts a stage's finished chunks, logs the progress line and records the counters.

    Thread-safe: the loader reports chunks from its worker threads.
    """

    def __init__(self, log: Callable[[str], None], stage: str, batch_id: str,
                 total: int | None, *, record: bool = True) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self._log = log
        self.stage = stage
        self.batch_id = batch_id
        self.total = total
        self._record = record
        self.done = 0
        self.rows = 0
        self.started = time.monotonic()
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
