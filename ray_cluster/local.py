"""Single-node Ray head for local development (the "embedded" stack).

This module owns the lifecycle of exactly one process tree: a
``ray start --head --block`` started by us, bound to loopback, with its PID kept
in ``<repo>/.state/pids/ray.pid`` (the layout of ``scripts/stack.py``). It never
calls ``ray stop`` (that kills every Ray process on the machine, including other
people's clusters); it stops only the process tree it started.

Used by ``scripts/stack.py``; also runnable on its own::

    python ray_cluster/local.py {start,stop,status}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STATE_ROOT = REPO_ROOT / ".state"

LOOPBACK = "127.0.0.1"
GCS_PORT = 56379
DASHBOARD_PORT = 8265
# Ray's defaults (10001 for the Ray Client server, 52365 for the dashboard
# agent) would clash with any other Ray on this machine; pin them next to GCS.
CLIENT_SERVER_PORT = 56380
DASHBOARD_AGENT_LISTEN_PORT = 56381
# Prometheus endpoints of the autoscaler monitor and the dashboard default to
# fixed ports (44217, 44227) shared by every Ray on the machine.
AUTOSCALER_METRIC_PORT = 56382
DASHBOARD_METRIC_PORT = 56383
NUM_CPUS = 2
OBJECT_STORE_BYTES = 1 << 30  # 1 GiB

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


class RayHeadError(RuntimeError):
    """The local Ray head could not be started, stopped or reached."""


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class RayHead:
    """Where and how the local head runs (see ``in_state_root`` for the stack's layout)."""

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

    def command(self) -> list[str]:
        """The ``ray start`` command line for the head."""
        return [
            str(self.ray_executable),
            "start",
            "--head",
            f"--node-ip-address={self.host}",
            f"--port={self.port}",
            f"--dashboard-host={self.host}",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_server_port}",
            f"--dashboard-agent-listen-port={self.dashboard_agent_listen_port}",
            f"--num-cpus={self.num_cpus}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            # --block keeps `ray start` in the foreground as the parent of GCS,
            # raylet, dashboard...: one PID to track and one process group to
            # signal, and SIGTERM makes it drain and stop its children.
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


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def running_pid(head: RayHead) -> int | None:
    """PID of our running head, or None. Removes a stale PID file."""
    pid = _read_pid(head.pid_file)
    if pid is None:
        return None
    if _is_our_head(head, pid):
        return pid
    head.pid_file.unlink(missing_ok=True)
    return None


def _reset_signals() -> None:
    # Background launchers may leave SIGINT/SIGTERM ignored, and ignored
    # signals survive exec: the head would then ignore our SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


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
    for directory in (head.state_dir, head.log_path.parent, head.pid_file.parent):
        directory.mkdir(parents=True, exist_ok=True)
    env = ray_env()
    env["AUTOSCALER_METRIC_PORT"] = str(AUTOSCALER_METRIC_PORT)
    env["DASHBOARD_METRIC_PORT"] = str(DASHBOARD_METRIC_PORT)
    with head.log_path.open("ab") as log_fh:
        proc = subprocess.Popen(
            head.command(),
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=head.state_dir,
            preexec_fn=_reset_signals,
            start_new_session=True,
        )
    head.pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


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


def stop(head: RayHead, timeout: float = 45.0) -> bool:
    """Stop our head and everything it spawned; return False if nothing was running.

    SIGTERM goes to `ray start` only: it drains the node (up to 30 s when tasks
    are running) and then stops GCS, raylet, dashboard and workers itself.
    """
    pid = running_pid(head)
    if pid is None:
        return False
    terminate_tree(pid, timeout, signal_group=False)
    head.pid_file.unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python ray_cluster/local.py {start,stop,status}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--state-root", type=Path, default=DEFAULT_STATE_ROOT)
    parser.add_argument("--timeout", type=float, default=90.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    head = RayHead.in_state_root(args.state_root)

    if args.command == "start":
        pid = start(head)
        try:
            wait_until_ready(head, timeout=args.timeout)
        except RayHeadError as exc:
            log.error("%s", exc)
            return 1
        log.info("ray head ready: pid %d, %s, dashboard %s", pid, head.address, head.dashboard_url)
        return 0
    if args.command == "stop":
        log.info("ray head %s", "stopped" if stop(head) else "was not running")
        return 0
    pid = running_pid(head)
    ready = pid is not None and is_ready(head)
    log.info(
        "ray head: pid %s, %s, dashboard %s, %s",
        pid or "-",
        head.address,
        head.dashboard_url,
        "ready" if ready else "DOWN",
    )
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
