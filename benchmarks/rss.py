"""Peak RSS of every process a pipeline run involves, sampled on a background thread.

The set is re-discovered during the run, because processes come and go: the pipeline's own
process tree, the Ray workers of the run's Ray job (``RAY_JOB_ID`` in their environment) and
the PostgreSQL backends serving the tree's connections (matched on the client port in their
process title). The shared object store is not counted. The peak is the largest sum over one
sample, not the sum of per-process peaks.

Discovering the Ray workers and the backends is the expensive part, so it runs every
``discover_s`` while their RSS is read every sample. PSS (shared pages divided among their
sharers) is reported beside RSS, read only when the RSS sum has grown by 3%, because reading
it walks page tables. What each step costs and why: see docs/benchmark-methods.md.
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
