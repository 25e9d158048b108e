"""Peak RSS of every process a pipeline run involves, sampled on a background thread.

The set is re-discovered on every sample, because processes come and go during a run:

* the pipeline's own process tree (the Dagster process, ogr2ogr children, dask workers);
* Ray worker processes of the run's Ray job (matched on ``RAY_JOB_ID`` in their environment;
  the shared head's daemons and other jobs' workers are not counted);
* PostgreSQL backends serving the tree's connections: a backend's process title names its
  client's address and port ("postgres: user db 127.0.0.1(51234) idle"), matched against the
  local ports of the tree's TCP connections to the server.

The object store (SeaweedFS) is a shared service and is not counted. The peak is the largest
sum over one sample, not the sum of per-process peaks.

Finding the Ray workers (every process's name, a new one's environment) and the backends
(the tree's sockets, parsed from /proc/net/tcp, which holds hundreds of sockets while a run
moves chunks) costs ~15 ms; done every 50 ms it took a quarter of a core from the 2-core
machine the run is measured on, more from ours (Ray workers, several connections) than
from a one-process peer. So those two sets are found again every ``discover_s`` (0.5 s) and
only their RSS is read every sample; the tree (~1.5 ms) is walked every sample.

Summed RSS counts every shared page once per process that maps it: PostgreSQL's shared
buffers in each backend, Ray's object store and the same GDAL/PROJ/GEOS/Arrow libraries in
each worker. The proportional set size (PSS: a shared page divided among its sharers) sums
to the memory the processes really hold, so it is reported beside it. Reading PSS costs the
kernel a page-table walk (~7 ms per large process), too much every 50 ms, so it is read
whenever the RSS sum reaches 3% above its value at the last PSS reading: the PSS peak is
taken at the RSS peaks, which is where it lies unless sharing changes much in between.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

import psutil

_MIB = 1024 * 1024
_TITLE_PORT = re.compile(r"\((\d+)\)")


@dataclass
class RssPeak:
    total_mib: float = 0.0
    parts_mib: dict[str, float] = field(default_factory=dict)  # the parts at the peak sample
    samples: int = 0
    pss_mib: float = 0.0  # largest PSS sum read (see the module docstring)
    pss_parts_mib: dict[str, float] = field(default_factory=dict)


class ProcessTreeSampler:
    """``with ProcessTreeSampler(pid, ...) as sampler: ...`` then ``sampler.peak``."""

    def __init__(self, root_pid: int, *, postgres_port: int | None = None, ray_job_id: str | None = None,
                 interval_s: float = 0.05, discover_s: float = 0.5):
        self.root = psutil.Process(root_pid)
        self.postgres_port = postgres_port
        self.ray_job_id = ray_job_id
        self.interval_s = interval_s
        self.discover_s = discover_s
        self._next_discovery = 0.0
        self._workers: list[psutil.Process] = []
        self._pg_backends: list[psutil.Process] = []
        self.peak = RssPeak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._job_of: dict[int, str | None] = {}
        self._rss_at_pss = 0.0
        self._postmaster = self._find_postmaster() if postgres_port else None

    def __enter__(self) -> ProcessTreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._next_discovery = 0.0
        self.sample()  # one last look: a short run may fit between two ticks

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        tree = self._tree()
        now = time.monotonic()
        if now >= self._next_discovery:
            self._workers, self._pg_backends = self._ray_workers(), self._backends(tree)
            self._next_discovery = now + self.discover_s
        groups = {"tree": tree, "ray_workers": self._workers,
                  "postgres_backends": self._pg_backends}
        parts = {name: sum(_rss(p) for p in procs) for name, procs in groups.items()}
        total = sum(parts.values()) / _MIB
        self.peak.samples += 1
        if total > self.peak.total_mib:
            self.peak.total_mib = total
            self.peak.parts_mib = {k: round(v / _MIB, 1) for k, v in parts.items()}
        if total >= self._rss_at_pss * 1.03:
            self._rss_at_pss = total
            pss = {name: sum(_pss(p) for p in procs) for name, procs in groups.items()}
            pss_total = sum(pss.values()) / _MIB
            if pss_total > self.peak.pss_mib:
                self.peak.pss_mib = pss_total
                self.peak.pss_parts_mib = {k: round(v / _MIB, 1) for k, v in pss.items()}

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _ray_workers(self) -> list[psutil.Process]:
        if not self.ray_job_id:
            return []
        found = []
        for proc in psutil.process_iter(["name"]):
            if not (proc.info["name"] or "").startswith("ray::"):
                continue
            if proc.pid not in self._job_of:
                try:
                    self._job_of[proc.pid] = proc.environ().get("RAY_JOB_ID")
                except (psutil.Error, OSError):
                    self._job_of[proc.pid] = None
            if self._job_of[proc.pid] == self.ray_job_id:
                found.append(proc)
        return found

    def _find_postmaster(self) -> psutil.Process | None:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == self.postgres_port and conn.pid:
                return psutil.Process(conn.pid)
        return None

    def _backends(self, tree: list[psutil.Process]) -> list[psutil.Process]:
        if self._postmaster is None:
            return []
        ports = set()
        for proc in tree:
            try:
                ports.update(c.laddr.port for c in proc.net_connections(kind="tcp")
                             if c.raddr and c.raddr.port == self.postgres_port)
            except psutil.Error:
                continue
        if not ports:
            return []
        backends = []
        try:
            children = self._postmaster.children()
        except psutil.NoSuchProcess:
            return []
        for proc in children:
            try:
                match = _TITLE_PORT.search(" ".join(proc.cmdline()))
            except psutil.Error:
                continue
            if match and int(match.group(1)) in ports:
                backends.append(proc)
        return backends


def _rss(proc: psutil.Process) -> int:
    try:
        return proc.memory_info().rss
    except psutil.Error:
        return 0


def _pss(proc: psutil.Process) -> int:
    """Proportional set size from /proc/<pid>/smaps_rollup (bytes); 0 when unreadable."""
    try:
        with open(f"/proc/{proc.pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
