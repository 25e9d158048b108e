"""Starting, scaling and stopping a local Ray cluster (``devstack.ray_layout``) by PID: the
head's ``ray start --head --block`` and N worker nodes' ``ray start --address --block``, each
one process tree with its PID in a file. It never calls ``ray stop``, which kills every Ray
process on the machine, other people's clusters included.

The stack runs the head alone (light on 2 cores; ``python -m devstack ray start --workers N``
adds worker nodes); the multi-node tests run a cluster of their own (``running_cluster``).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devstack.layout import STATE
from devstack.procs import cmdline, launch, live_pid, port_in_use, terminate_tree
from devstack.ray_layout import DRIVER_CHECK, MAX_WORKERS, RayHead, RayWorker, auth_headers, ray_env
from devstack.service import Service, StackError, Status

log = logging.getLogger(__name__)

#: The stack's head (GCS 56379, dashboard 8265, 2 CPUs), files under .state/.
STACK_HEAD = RayHead.in_state_root(STATE)


class RayHeadError(StackError):
    """The local Ray head (or one of its workers) could not be started, stopped or reached."""


def _is_our_head(head: RayHead, pid: int) -> bool:
    """True if ``pid`` is alive and is the ``ray start`` we launched (not a reused PID)."""
    args = cmdline(pid)
    return "start" in args and "--head" in args and f"--temp-dir={head.temp_dir}" in args


def _is_our_worker(worker: RayWorker, pid: int) -> bool:
    """True if ``pid`` is alive and is worker ``worker.index``'s ``ray start`` (zombies have no
    command line, so a killed worker not yet reaped counts as gone)."""
    args = cmdline(pid)
    return ("start" in args and "--head" not in args
            and f"--address={worker.head.address}" in args
            and f"--temp-dir={worker.head.temp_dir}" in args
            and f"--node-manager-port={worker.ports.node_manager}" in args)


def running_pid(head: RayHead) -> int | None:
    """PID of our running head, or None. Removes a stale PID file."""
    return live_pid(head.pid_file, lambda pid: _is_our_head(head, pid))


def worker_pid(worker: RayWorker) -> int | None:
    """PID of the worker's running ``ray start``, or None. Removes a stale PID file."""
    return live_pid(worker.pid_file, lambda pid: _is_our_worker(worker, pid))


def running_workers(head: RayHead) -> dict[int, int]:
    """``{worker index: pid}`` of this cluster's running workers."""
    found = {}
    for index in range(1, MAX_WORKERS + 1):
        pid = worker_pid(head.worker(index))
        if pid is not None:
            found[index] = pid
    return found


def start(head: RayHead) -> int:
    """Launch the head if it is not running; return its PID. Does not wait for readiness."""
    pid = running_pid(head)
    if pid is not None:
        return pid
    if port_in_use(head.port, head.host):
        raise RayHeadError(
            f"{head.address} is already in use by a process we did not start "
            f"(see `ss -ltnp 'sport = :{head.port}'`)"
        )
    # Left by our previous head (SIGTERM does not remove it): `ray start --head` refuses to
    # start when it names a GCS address that some gcs_server on this machine uses, and that
    # can be another network namespace's stack on the same loopback port.
    (head.temp_dir / "ray_current_cluster").unlink(missing_ok=True)
    env = head.node_env()
    env["AUTOSCALER_METRIC_PORT"] = str(head.autoscaler_metric_port)
    env["DASHBOARD_METRIC_PORT"] = str(head.dashboard_metric_port)
    return launch(head.command(), head.log_path, head.pid_file, cwd=head.state_dir, env=env)


def start_worker(worker: RayWorker) -> int:
    """Launch one worker node if it is not running; return its PID. The head must be up."""
    pid = worker_pid(worker)
    if pid is not None:
        return pid
    if running_pid(worker.head) is None:
        raise RayHeadError(f"cannot start {worker.name}: the head {worker.head.address} is not "
                           "running (start it first)")
    busy = [port for port in worker.ports.all() if port_in_use(port, worker.head.host)]
    if busy:
        raise RayHeadError(f"cannot start {worker.name}: port(s) {busy} already in use by a "
                           f"process we did not start (see `ss -ltnp`)")
    return launch(worker.command(), worker.log_path, worker.pid_file, cwd=worker.head.state_dir,
                  env=worker.head.node_env())


def scale_workers(head: RayHead, count: int, timeout: float = 45.0) -> dict[int, int]:
    """Make workers 1..``count`` run and no others: starts the missing ones, stops (by PID,
    highest index first) those above ``count``. Idempotent. Returns ``{index: pid}``."""
    if not 0 <= count <= MAX_WORKERS:
        raise ValueError(f"workers must be 0..{MAX_WORKERS}, got {count}")
    for index in sorted(running_workers(head), reverse=True):
        if index > count:
            stop_worker(head.worker(index), timeout=timeout)
    return {index: start_worker(head.worker(index)) for index in range(1, count + 1)}


def dashboard_request(url: str) -> urllib.request.Request:
    """A GET of the dashboard's API carrying the stack's token (token auth is on)."""
    return urllib.request.Request(url, headers=auth_headers())


def alive_nodes(head: RayHead, timeout: float = 5.0) -> list[dict]:
    """The cluster's ALIVE nodes from the dashboard's state API (node_id, is_head_node, ...)."""
    url = f"{head.dashboard_url}/api/v0/nodes?limit=1000&detail=1"
    with urllib.request.urlopen(dashboard_request(url), timeout=timeout) as resp:
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
    with urllib.request.urlopen(dashboard_request(url), timeout=timeout) as resp:
        return json.loads(resp.read())


def check_task_roundtrip(head: RayHead, timeout: float = 60.0) -> None:
    """Connect a driver and run one task, in a subprocess (no Ray state in this process)."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", DRIVER_CHECK, head.address, str(timeout)],
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


def describe(head: RayHead) -> list[str]:
    """One line for the head (ending in ``ready`` or ``DOWN``), one per worker, then the nodes."""
    pid = running_pid(head)
    ready = pid is not None and is_ready(head)
    lines = [f"ray head: pid {pid or '-'}, {head.address}, dashboard {head.dashboard_url}, "
             f"metrics {head.metrics_url}, {head.num_cpus} CPU, {'ready' if ready else 'DOWN'}"]
    for index, worker_pid_ in sorted(running_workers(head).items()):
        worker = head.worker(index)
        lines.append(f"{worker.name}: pid {worker_pid_}, node manager :{worker.ports.node_manager}"
                     f", metrics {worker.metrics_url}, {head.worker_num_cpus} CPU")
    if ready:
        nodes = alive_nodes(head)
        lines.append(f"{len(nodes)} node(s) ALIVE: " + ", ".join(
            f"{n['node_id'][:8]}{' (head)' if n['is_head_node'] else ''}" for n in nodes))
    return lines


def _started_with_token_auth(pid: int) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return True  # not ours to judge: leave it running
    return b"RAY_AUTH_MODE=token" in environ


class RayService(Service):
    """The stack's Ray: its head, and on ``down`` any worker nodes added next to it."""

    name = "ray"
    address = f"{STACK_HEAD.address} (dashboard {STACK_HEAD.dashboard_url})"

    def spawn(self) -> bool:
        pid = running_pid(STACK_HEAD)
        if pid is not None:
            if _started_with_token_auth(pid):
                return False
            # a head of an older stack (RAY_AUTH_MODE=disabled) would refuse no one
            log.warning("the running Ray head has no token auth: restarting it with the token")
            stop(STACK_HEAD)
        try:
            start(STACK_HEAD)
        except RayHeadError as exc:
            raise RayHeadError(f"{exc}; see {STACK_HEAD.log_path}") from exc
        return True

    def wait_ready(self) -> None:
        wait_until_ready(STACK_HEAD, timeout=120)

    def stop(self) -> bool:
        return stop(STACK_HEAD)

    def status(self) -> list[Status]:
        pid = running_pid(STACK_HEAD)
        ready = pid is not None and is_ready(STACK_HEAD)
        return [Status(self.name, pid, self.address, ready, STACK_HEAD.log_path)]

    def state_paths(self) -> list[Path]:
        workers = [STACK_HEAD.worker(index) for index in range(1, MAX_WORKERS + 1)]
        return [STACK_HEAD.state_dir, STACK_HEAD.temp_dir, STACK_HEAD.log_path, STACK_HEAD.pid_file,
                *(worker.log_path for worker in workers), *(worker.pid_file for worker in workers)]
