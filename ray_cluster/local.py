"""Local Ray cluster for development and tests: one head and N worker nodes on this machine.

This module owns the lifecycle of the process trees it starts: a ``ray start --head --block``
and, optionally, N ``ray start --address=<head> --block`` worker nodes (each its own raylet,
object store and dashboard agent), all bound to loopback, each with its PID in a file
(``<repo>/.state/pids/ray.pid`` and ``ray-worker-<i>.pid`` in the layout of
``scripts/stack.py``). It never calls ``ray stop`` (that kills every Ray process on the
machine, including other people's clusters); it stops only the process trees it started.

Ports: a cluster takes a block of 100 ports starting at its GCS port ``P`` (the stack's is
56379), so two clusters (the stack's and a test's at 26479) never clash, and nothing falls
back to Ray's machine-wide defaults (52365 for the dashboard agent, 44217/44227 for the
autoscaler and dashboard metrics, 10001 for Ray Client)::

    P+0 GCS   P+1 Ray Client   P+2 dashboard agent (HTTP)   P+3 autoscaler metrics
    P+4 dashboard metrics      P+5 head's Prometheus metrics export
    P+6 node manager   P+7 object manager   P+8 dashboard agent gRPC   P+9 runtime-env agent
    P+10*i + 0..5   worker i (1..8): node manager, object manager, metrics export,
                    dashboard agent HTTP, dashboard agent gRPC, runtime-env agent
    P+90            dashboard of a non-stack cluster (the stack's is 8265)

Temp dir: Ray keeps each node's sockets and logs under ``<temp>/session_*``. Nodes started
on one machine join the head's session directory (a worker given no ``--temp-dir`` takes the
head's from the GCS); we pass the head's temp dir explicitly to every worker, which is the
same thing said out loud and also lets us recognise our processes by their command line.

Used by ``scripts/stack.py`` (head only: the embedded stack stays light on 2 cores) and by
the multi-node tests (``running_cluster``); also runnable on its own::

    python ray_cluster/local.py start [--workers N]   # idempotent: adds/removes workers to N
    python ray_cluster/local.py status
    python ray_cluster/local.py stop                  # workers first, then the head
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STATE_ROOT = REPO_ROOT / ".state"

LOOPBACK = "127.0.0.1"
GCS_PORT = 56379
DASHBOARD_PORT = 8265
# Offsets in a cluster's block of ports (see the module docstring).
CLIENT_SERVER_OFFSET = 1
DASHBOARD_AGENT_LISTEN_OFFSET = 2
AUTOSCALER_METRIC_OFFSET = 3
DASHBOARD_METRIC_OFFSET = 4
HEAD_NODE_PORTS_OFFSET = 5
WORKER_BLOCK = 10
DASHBOARD_OFFSET = 90
MAX_WORKERS = 8
# The stack's head, as scripts/stack.py has always started it. Ray's defaults (10001 for
# the Ray Client server, 52365 for the dashboard agent, 44217/44227 for the autoscaler and
# dashboard Prometheus endpoints) would clash with any other Ray on this machine.
CLIENT_SERVER_PORT = GCS_PORT + CLIENT_SERVER_OFFSET
DASHBOARD_AGENT_LISTEN_PORT = GCS_PORT + DASHBOARD_AGENT_LISTEN_OFFSET
AUTOSCALER_METRIC_PORT = GCS_PORT + AUTOSCALER_METRIC_OFFSET
DASHBOARD_METRIC_PORT = GCS_PORT + DASHBOARD_METRIC_OFFSET
#: Prometheus endpoint of the stack head's metrics agent (Ray's own and our application
#: metrics); worker i exports on GCS_PORT + 10*i + 2.
METRICS_EXPORT_PORT = GCS_PORT + HEAD_NODE_PORTS_OFFSET
NUM_CPUS = 2
OBJECT_STORE_BYTES = 1 << 30  # 1 GiB
WORKER_NUM_CPUS = 1
WORKER_OBJECT_STORE_BYTES = 512 << 20  # 512 MiB: chunks pass through object storage, not Ray

# Environment every process of the local cluster (head and drivers) must share.
RAY_ENV: Mapping[str, str] = {
    # On Linux Ray rewrites a loopback address ("127.0.0.1") to the machine's
    # external IP unless "clusters" are disabled: without this the head would
    # advertise 192.0.2.x and a driver connecting to 127.0.0.1:56379 is silently
    # redirected to the external address, where nothing listens, and hangs.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Token auth, decided explicitly. With RAY_AUTH_MODE unset, Ray 2.60 picks
    # the mode implicitly: a bare `ray.init()` (e.g. in a unit test) starts a
    # throwaway cluster WITH token auth and writes ~/.ray/auth_token; from then
    # on `ray start --head` silently enables token auth too, while drivers that
    # connect to an explicit address do not, so they get rejected (2.61 turns
    # token auth on for every cluster). Here every listener is on 127.0.0.1 of
    # a single-developer machine, so a token would only be one more secret for
    # every driver, Dagster process and test to carry: we pin "disabled" for
    # the head and (via stack.env) for the drivers, whatever is in ~/.ray.
    # Do NOT copy this to a networked cluster: there RAY_AUTH_MODE=token is
    # what stands between the network and arbitrary code execution.
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}

_DRIVER_CHECK = textwrap.dedent(
    """
    import sys
    import ray

    ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")

    @ray.remote
    def _plus_one(x):
        return x + 1

    assert ray.get(_plus_one.remote(41), timeout=float(sys.argv[2])) == 42
    ray.shutdown()
    """
)


# `ray start --address=...` with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which RAY_ENV needs to
# keep every address on loopback, see there) refuses to start a worker node: Ray reads that
# one flag both as "is multi-node allowed" (a guard meant for Windows/macOS) and as "keep
# 127.0.0.1 instead of the machine's external IP". With the flag at 1 the worker would
# rewrite the head's 127.0.0.1 to the external IP, where nothing listens. So the worker runs
# Ray's own CLI with the guard alone lifted: only the `scripts` module sees the flag as 1;
# address resolution (ray._private.services) and every child process keep 0 (loopback).
_WORKER_LAUNCHER = textwrap.dedent(
    """
    import sys
    import types

    import ray._private.ray_constants as constants
    from ray.scripts import scripts

    scripts.ray_constants = types.SimpleNamespace(**{**vars(constants), "ENABLE_RAY_CLUSTER": True})
    sys.argv[0] = "ray"
    scripts.main()
    """
)


class RayHeadError(RuntimeError):
    """The local Ray head (or one of its workers) could not be started, stopped or reached."""


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class NodePorts:
    """The fixed ports of one node's raylet and agents (never Ray's random or shared defaults)."""

    node_manager: int
    object_manager: int
    metrics_export: int
    dashboard_agent_listen: int
    dashboard_agent_grpc: int
    runtime_env_agent: int

    def flags(self) -> list[str]:
        return [
            f"--node-manager-port={self.node_manager}",
            f"--object-manager-port={self.object_manager}",
            f"--metrics-export-port={self.metrics_export}",
            f"--dashboard-agent-listen-port={self.dashboard_agent_listen}",
            f"--dashboard-agent-grpc-port={self.dashboard_agent_grpc}",
            f"--runtime-env-agent-port={self.runtime_env_agent}",
        ]

    def all(self) -> list[int]:
        return [self.node_manager, self.object_manager, self.metrics_export,
                self.dashboard_agent_listen, self.dashboard_agent_grpc, self.runtime_env_agent]


@dataclass(frozen=True)
class RayHead:
    """Where and how the local cluster runs: the head, and the shape of its worker nodes.

    ``in_state_root`` is the stack's layout (GCS 56379, dashboard 8265, 2 CPUs);
    ``port_block`` makes a separate cluster (e.g. a test's at 26479) from one base port.
    """

    state_dir: Path
    log_file: Path | None = None
    pid_path: Path | None = None
    host: str = LOOPBACK
    port: int = GCS_PORT
    dashboard_port: int = DASHBOARD_PORT
    client_server_port: int = CLIENT_SERVER_PORT
    dashboard_agent_listen_port: int = DASHBOARD_AGENT_LISTEN_PORT
    num_cpus: int = NUM_CPUS
    object_store_bytes: int = OBJECT_STORE_BYTES
    worker_num_cpus: int = WORKER_NUM_CPUS
    worker_object_store_bytes: int = WORKER_OBJECT_STORE_BYTES
    # Not resolved on purpose: a venv's bin/python is a symlink to the base
    # interpreter, but the `ray` entry point lives next to the symlink.
    ray_executable: Path = field(default_factory=lambda: Path(sys.executable).parent / "ray")

    @classmethod
    def in_state_root(cls, state_root: Path = DEFAULT_STATE_ROOT) -> RayHead:
        """The layout shared with scripts/stack.py: ray/, pids/ray.pid, logs/ray.log."""
        return cls(
            state_dir=state_root / "ray",
            log_file=state_root / "logs" / "ray.log",
            pid_path=state_root / "pids" / "ray.pid",
        )

    @classmethod
    def port_block(cls, state_dir: Path, gcs_port: int, *, num_cpus: int = 1,
                   object_store_bytes: int = 256 << 20, worker_num_cpus: int = 1,
                   worker_object_store_bytes: int = 256 << 20) -> RayHead:
        """A cluster of its own: every port in ``gcs_port``..``gcs_port + 99``, state and PID
        files under ``state_dir``. Small object stores by default (tests move descriptors)."""
        return cls(
            state_dir=state_dir,
            port=gcs_port,
            dashboard_port=gcs_port + DASHBOARD_OFFSET,
            client_server_port=gcs_port + CLIENT_SERVER_OFFSET,
            dashboard_agent_listen_port=gcs_port + DASHBOARD_AGENT_LISTEN_OFFSET,
            num_cpus=num_cpus,
            object_store_bytes=object_store_bytes,
            worker_num_cpus=worker_num_cpus,
            worker_object_store_bytes=worker_object_store_bytes,
        )

    @property
    def temp_dir(self) -> Path:
        # Ray puts unix sockets under <temp>/session_<timestamp>_<pid>/sockets/
        # and AF_UNIX paths are limited to 107 bytes, so the temp dir cannot
        # live under the repository; keep it short and unique per checkout.
        return Path("/tmp") / f"ray-{_short_hash(str(self.state_dir.resolve()))}"

    @property
    def pid_file(self) -> Path:
        return self.pid_path or self.state_dir / "head.pid"

    @property
    def log_path(self) -> Path:
        return self.log_file or self.state_dir / "head.log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"

    @property
    def session_logs(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"

    @property
    def autoscaler_metric_port(self) -> int:
        return self.port + AUTOSCALER_METRIC_OFFSET

    @property
    def dashboard_metric_port(self) -> int:
        return self.port + DASHBOARD_METRIC_OFFSET

    @property
    def node_ports(self) -> NodePorts:
        """The head node's raylet and agent ports."""
        base = self.port + HEAD_NODE_PORTS_OFFSET
        # metrics export first: it is the one a Prometheus config names
        return NodePorts(metrics_export=base, node_manager=base + 1, object_manager=base + 2,
                         dashboard_agent_listen=self.dashboard_agent_listen_port,
                         dashboard_agent_grpc=base + 3, runtime_env_agent=base + 4)

    @property
    def metrics_url(self) -> str:
        """The head's Prometheus endpoint (Ray's system metrics and our application metrics)."""
        return f"http://{self.host}:{self.node_ports.metrics_export}/metrics"

    def worker(self, index: int) -> RayWorker:
        """Worker node ``index`` (1..MAX_WORKERS) of this cluster."""
        return RayWorker(self, index)

    def command(self) -> list[str]:
        """The ``ray start`` command line for the head."""
        ports = self.node_ports
        return [
            str(self.ray_executable),
            "start",
            "--head",
            f"--node-ip-address={self.host}",
            f"--port={self.port}",
            f"--dashboard-host={self.host}",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_server_port}",
            *ports.flags(),
            f"--num-cpus={self.num_cpus}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            # --block keeps `ray start` in the foreground as the parent of GCS,
            # raylet, dashboard...: one PID to track and one process group to
            # signal, and SIGTERM makes it drain and stop its children.
            "--block",
        ]


@dataclass(frozen=True)
class RayWorker:
    """Worker node ``index`` of a local cluster: its own raylet, object store and agents."""

    head: RayHead
    index: int

    def __post_init__(self) -> None:
        if not 1 <= self.index <= MAX_WORKERS:
            raise ValueError(f"worker index must be 1..{MAX_WORKERS} (the port block holds "
                             f"{MAX_WORKERS} workers), got {self.index}")

    @property
    def name(self) -> str:
        return f"ray-worker-{self.index}"

    @property
    def pid_file(self) -> Path:
        return self.head.pid_file.with_name(f"{self.name}.pid")

    @property
    def log_path(self) -> Path:
        return self.head.log_path.with_name(f"{self.name}.log")

    @property
    def ports(self) -> NodePorts:
        base = self.head.port + WORKER_BLOCK * self.index
        return NodePorts(node_manager=base, object_manager=base + 1, metrics_export=base + 2,
                         dashboard_agent_listen=base + 3, dashboard_agent_grpc=base + 4,
                         runtime_env_agent=base + 5)

    @property
    def metrics_url(self) -> str:
        return f"http://{self.head.host}:{self.ports.metrics_export}/metrics"

    def command(self) -> list[str]:
        """The ``ray start`` command line that joins this worker to the head (through
        ``_WORKER_LAUNCHER``, see there why)."""
        return [
            sys.executable,
            "-c",
            _WORKER_LAUNCHER,
            "start",
            f"--address={self.head.address}",
            f"--node-ip-address={self.head.host}",
            *self.ports.flags(),
            f"--num-cpus={self.head.worker_num_cpus}",
            f"--object-store-memory={self.head.worker_object_store_bytes}",
            # the head's session directory, which a worker on the head's machine joins anyway
            f"--temp-dir={self.head.temp_dir}",
            "--disable-usage-stats",
            "--block",
        ]


def ray_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: ``os.environ``) plus the variables the local cluster needs."""
    env = dict(os.environ if base is None else base)
    env.update(RAY_ENV)
    # A RAY_ADDRESS pointing elsewhere must not leak into `ray start --head`.
    env.pop("RAY_ADDRESS", None)
    return env


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is_our_head(head: RayHead, pid: int) -> bool:
    """True if ``pid`` is alive and is the ``ray start`` we launched (not a reused PID)."""
    args = _cmdline(pid)
    return "start" in args and "--head" in args and f"--temp-dir={head.temp_dir}" in args


def _is_our_worker(worker: RayWorker, pid: int) -> bool:
    """True if ``pid`` is alive and is worker ``worker.index``'s ``ray start`` (zombies have no
    command line, so a killed worker not yet reaped counts as gone)."""
    args = _cmdline(pid)
    return ("start" in args and "--head" not in args
            and f"--address={worker.head.address}" in args
            and f"--temp-dir={worker.head.temp_dir}" in args
            and f"--node-manager-port={worker.ports.node_manager}" in args)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _live_pid(pid_file: Path, is_ours) -> int | None:
    """The PID in ``pid_file`` if ``is_ours(pid)``, else None; a stale file is removed."""
    pid = _read_pid(pid_file)
    if pid is None:
        return None
    if is_ours(pid):
        return pid
    pid_file.unlink(missing_ok=True)
    return None


def running_pid(head: RayHead) -> int | None:
    """PID of our running head, or None. Removes a stale PID file."""
    return _live_pid(head.pid_file, lambda pid: _is_our_head(head, pid))


def worker_pid(worker: RayWorker) -> int | None:
    """PID of the worker's running ``ray start``, or None. Removes a stale PID file."""
    return _live_pid(worker.pid_file, lambda pid: _is_our_worker(worker, pid))


def running_workers(head: RayHead) -> dict[int, int]:
    """``{worker index: pid}`` of this cluster's running workers."""
    found = {}
    for index in range(1, MAX_WORKERS + 1):
        pid = worker_pid(head.worker(index))
        if pid is not None:
            found[index] = pid
    return found


def _reset_signals() -> None:
    # Background launchers may leave SIGINT/SIGTERM ignored, and ignored
    # signals survive exec: the head would then ignore our SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _launch(command: list[str], log_path: Path, pid_file: Path, cwd: Path,
            env: dict[str, str]) -> int:
    for directory in (cwd, log_path.parent, pid_file.parent):
        directory.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_fh:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            preexec_fn=_reset_signals,
            start_new_session=True,
        )
    pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def start(head: RayHead) -> int:
    """Launch the head if it is not running; return its PID. Does not wait for readiness."""
    pid = running_pid(head)
    if pid is not None:
        return pid
    if _port_open(head.host, head.port):
        raise RayHeadError(
            f"{head.address} is already in use by a process we did not start "
            f"(see `ss -ltnp 'sport = :{head.port}'`)"
        )
    env = ray_env()
    env["AUTOSCALER_METRIC_PORT"] = str(head.autoscaler_metric_port)
    env["DASHBOARD_METRIC_PORT"] = str(head.dashboard_metric_port)
    return _launch(head.command(), head.log_path, head.pid_file, head.state_dir, env)


def start_worker(worker: RayWorker) -> int:
    """Launch one worker node if it is not running; return its PID. The head must be up."""
    pid = worker_pid(worker)
    if pid is not None:
        return pid
    if running_pid(worker.head) is None:
        raise RayHeadError(f"cannot start {worker.name}: the head {worker.head.address} is not "
                           "running (start it first)")
    busy = [port for port in worker.ports.all() if _port_open(worker.head.host, port)]
    if busy:
        raise RayHeadError(f"cannot start {worker.name}: port(s) {busy} already in use by a "
                           f"process we did not start (see `ss -ltnp`)")
    return _launch(worker.command(), worker.log_path, worker.pid_file, worker.head.state_dir,
                   ray_env())


def scale_workers(head: RayHead, count: int, timeout: float = 45.0) -> dict[int, int]:
    """Make workers 1..``count`` run and no others: starts the missing ones, stops (by PID,
    highest index first) those above ``count``. Idempotent. Returns ``{index: pid}``."""
    if not 0 <= count <= MAX_WORKERS:
        raise ValueError(f"workers must be 0..{MAX_WORKERS}, got {count}")
    for index in sorted(running_workers(head), reverse=True):
        if index > count:
            stop_worker(head.worker(index), timeout=timeout)
    return {index: start_worker(head.worker(index)) for index in range(1, count + 1)}


def alive_nodes(head: RayHead, timeout: float = 5.0) -> list[dict]:
    """The cluster's ALIVE nodes from the dashboard's state API (node_id, is_head_node, ...)."""
    url = f"{head.dashboard_url}/api/v0/nodes?limit=1000&detail=1"
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        nodes = json.loads(resp.read())["data"]["result"]["result"]
    return [node for node in nodes if node["state"] == "ALIVE"]


def wait_for_nodes(head: RayHead, count: int, timeout: float = 90.0) -> list[dict]:
    """Block until exactly ``count`` nodes (head included) are ALIVE; return them."""
    deadline = time.monotonic() + timeout
    nodes: list[dict] = []
    while time.monotonic() < deadline:
        try:
            nodes = alive_nodes(head)
        except (OSError, ValueError, KeyError):
            nodes = []
        if len(nodes) == count:
            return nodes
        time.sleep(0.5)
    raise RayHeadError(f"{len(nodes)} node(s) alive in {head.address} after {timeout:.0f}s, "
                       f"expected {count}; see {head.log_path.parent} and {head.session_logs}")


def dashboard_version(head: RayHead, timeout: float = 3.0) -> dict[str, str]:
    """``GET /api/version`` on the dashboard; raises ``OSError`` when it does not answer."""
    url = f"{head.dashboard_url}/api/version"
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def check_task_roundtrip(head: RayHead, timeout: float = 60.0) -> None:
    """Connect a driver and run one task, in a subprocess (no Ray state in this process)."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", _DRIVER_CHECK, head.address, str(timeout)],
            env=ray_env(),
            capture_output=True,
            text=True,
            timeout=timeout + 15,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RayHeadError(f"driver round trip to {head.address} timed out") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise RayHeadError(f"driver round trip to {head.address} failed:\n{tail}")


def is_ready(head: RayHead) -> bool:
    """Dashboard answers and a task round trip succeeds."""
    try:
        dashboard_version(head)
        check_task_roundtrip(head, timeout=30)
    except (OSError, RayHeadError):
        return False
    return True


def wait_until_ready(head: RayHead, timeout: float = 90.0) -> None:
    """Block until the dashboard answers and a driver can run a task."""
    deadline = time.monotonic() + timeout
    while True:
        pid = running_pid(head)
        if pid is None:
            raise RayHeadError(f"ray head exited during startup; see {head.log_path} and {head.session_logs}")
        try:
            dashboard_version(head)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RayHeadError(
                    f"ray dashboard {head.dashboard_url} not answering after {timeout:.0f}s; "
                    f"see {head.log_path} and {head.session_logs}"
                ) from None
            time.sleep(0.5)
    try:
        check_task_roundtrip(head, timeout=max(10.0, deadline - time.monotonic()))
    except RayHeadError as exc:
        raise RayHeadError(f"{exc}\nsee {head.log_path} and {head.session_logs}") from exc


def _process_table() -> dict[int, tuple[int, int]]:
    """``{pid: (ppid, pgid)}`` for every process visible in /proc."""
    table: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        fields = stat.rsplit(")", 1)[1].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return table


def process_tree(root: int) -> set[int]:
    """``root``, its descendants and members of its process group (PGID == root)."""
    table = _process_table()
    members = {pid for pid, (_, pgid) in table.items() if pgid == root}
    if root in table:
        members.add(root)
    frontier = set(members)
    while frontier:
        children = {pid for pid, (ppid, _) in table.items() if ppid in frontier}
        frontier = children - members
        members |= frontier
    return members


def _signal(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def alive(pids: set[int]) -> set[int]:
    """The subset of ``pids`` that are running (zombies count as exited)."""
    running = set()
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            running.add(pid)
    return running


def terminate_tree(root: int, timeout: float, *, signal_group: bool) -> bool:
    """Stop ``root`` and everything it spawned: SIGTERM, wait, then SIGKILL what is left.

    With ``signal_group`` the whole tree gets SIGTERM at once (plain services in
    their own session); without it only ``root`` does, so it can shut its
    children down in order, and leftovers get SIGTERM once ``root`` is gone.
    Returns False if SIGKILL was needed. (Kept here, next to the Ray head that
    needs it, because this file must also run standalone; scripts/stack.py
    reuses it for the other services.)
    """
    tree = process_tree(root)
    signalled = set(tree) if signal_group else {root}
    _signal(signalled, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tree |= process_tree(root)
        remaining = alive(tree)
        if not remaining:
            return True
        if root not in remaining:
            stragglers = remaining - signalled
            _signal(stragglers, signal.SIGTERM)
            signalled |= stragglers
        time.sleep(0.2)
    log.warning("pid %d did not stop within %.0fs; sending SIGKILL", root, timeout)
    _signal(alive(tree), signal.SIGKILL)
    kill_deadline = time.monotonic() + 5
    while alive(tree) and time.monotonic() < kill_deadline:
        time.sleep(0.1)
    return False


def stop_worker(worker: RayWorker, timeout: float = 45.0) -> bool:
    """Stop one worker node's process tree; False if it was not running."""
    pid = worker_pid(worker)
    if pid is None:
        return False
    terminate_tree(pid, timeout, signal_group=False)
    worker.pid_file.unlink(missing_ok=True)
    return True


def stop(head: RayHead, timeout: float = 45.0) -> bool:
    """Stop our workers, then our head and everything it spawned; return False if the head
    was not running.

    SIGTERM goes to each `ray start` only: it drains the node (up to 30 s when tasks
    are running) and then stops GCS, raylet, dashboard and workers itself.
    """
    scale_workers(head, 0, timeout=timeout)
    pid = running_pid(head)
    if pid is None:
        return False
    terminate_tree(pid, timeout, signal_group=False)
    head.pid_file.unlink(missing_ok=True)
    return True


def _log_tails(head: RayHead, lines: int = 15) -> str:
    """The last lines of the head's own log and of its GCS and raylet logs, for an error."""
    parts = []
    for path in (head.log_path, head.session_logs / "gcs_server.out",
                 head.session_logs / "raylet.out", head.session_logs / "raylet.err"):
        try:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        parts.append(f"--- {path}\n" + "\n".join(tail))
    return "\n".join(parts)


@contextmanager
def running_cluster(head: RayHead, workers: int, *, timeout: float = 120.0,
                    remove_temp_dir: bool = True, start_attempts: int = 2) -> Iterator[RayHead]:
    """A cluster of our own for the length of a ``with`` block (tests): the head and
    ``workers`` worker nodes started, ready and all ALIVE; stopped by PID on exit, and its
    temp dir (session logs) removed unless ``remove_temp_dir`` is False.

    A start that fails (now and then on a loaded 2-core machine, ``ray start`` gives up with
    "The current node timed out during startup": the raylet never registered with the GCS)
    is logged with the tails of the head, GCS and raylet logs, stopped, and tried afresh, up
    to ``start_attempts`` times in all."""
    if running_pid(head) is not None:
        raise RayHeadError(f"a cluster is already running from {head.state_dir}; a test "
                           "cluster must be its own")
    try:
        for attempt in range(1, start_attempts + 1):
            pid = None
            try:
                pid = start(head)
                wait_until_ready(head, timeout=timeout)
                scale_workers(head, workers)
                wait_for_nodes(head, 1 + workers, timeout=timeout)
                break
            except RayHeadError as exc:
                if attempt == start_attempts:
                    raise RayHeadError(f"{exc}\n{_log_tails(head)}") from exc
                log.warning("ray cluster start %s of %s failed, starting afresh: %s\n%s",
                            attempt, start_attempts, exc, _log_tails(head))
                stop(head, timeout=30)
                if pid is not None:  # a `ray start` that gave up may leave its GCS behind
                    terminate_tree(pid, 30, signal_group=True)
                shutil.rmtree(head.temp_dir, ignore_errors=True)
        yield head
    finally:
        stop(head, timeout=30)
        if remove_temp_dir:
            shutil.rmtree(head.temp_dir, ignore_errors=True)


def _describe(head: RayHead) -> list[str]:
    pid = running_pid(head)
    ready = pid is not None and is_ready(head)
    lines = [f"ray head: pid {pid or '-'}, {head.address}, dashboard {head.dashboard_url}, "
             f"metrics {head.metrics_url}, {head.num_cpus} CPU, {'ready' if ready else 'DOWN'}"]
    for index, worker_pid_ in sorted(running_workers(head).items()):
        worker = head.worker(index)
        lines.append(f"{worker.name}: pid {worker_pid_}, node manager :{worker.ports.node_manager}"
                     f", metrics {worker.metrics_url}, {head.worker_num_cpus} CPU")
    if ready:
        alive = alive_nodes(head)
        lines.append(f"{len(alive)} node(s) ALIVE: " + ", ".join(
            f"{n['node_id'][:8]}{' (head)' if n['is_head_node'] else ''}" for n in alive))
    return lines


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python ray_cluster/local.py {start [--workers N],stop,status}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--state-root", type=Path, default=DEFAULT_STATE_ROOT)
    parser.add_argument("--timeout", type=float, default=90.0)
    parser.add_argument("--workers", type=int, default=None,
                        help=f"start: worker nodes to run, 0..{MAX_WORKERS} (default: keep "
                        "the running ones); extra workers are stopped, missing ones started")
    parser.add_argument("--worker-num-cpus", type=int, default=WORKER_NUM_CPUS,
                        help="CPUs each worker node offers to Ray (a logical count)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    head = dataclasses.replace(RayHead.in_state_root(args.state_root),
                               worker_num_cpus=args.worker_num_cpus)

    if args.command == "start":
        pid = start(head)
        try:
            wait_until_ready(head, timeout=args.timeout)
            count = len(running_workers(head)) if args.workers is None else args.workers
            workers = scale_workers(head, count)
            wait_for_nodes(head, 1 + count, timeout=args.timeout)
        except (RayHeadError, ValueError) as exc:
            log.error("%s", exc)
            return 1
        log.info("ray head ready: pid %d, %s, dashboard %s; %d worker(s): %s", pid, head.address,
                 head.dashboard_url, len(workers),
                 ", ".join(f"{i}: pid {p}" for i, p in workers.items()) or "-")
        return 0
    if args.command == "stop":
        log.info("ray head %s", "stopped" if stop(head) else "was not running")
        return 0
    lines = _describe(head)
    for line in lines:
        log.info("%s", line)
    return 0 if lines[0].endswith("ready") else 1


if __name__ == "__main__":
    sys.exit(main())
