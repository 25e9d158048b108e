"""The process toolkit: launch a service in its own session with a PID file, recognise it
again by its command line, and stop its whole process tree. Never by name (no ``pkill``, no
``ray stop``): only the trees we started are touched."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devstack.layout import LOGS, LOOPBACK, PIDS, REPO

log = logging.getLogger(__name__)


def cmdline(pid: int) -> list[str]:
    """The arguments of ``pid`` ([] if it is gone, or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def alive(pids: Iterable[int]) -> set[int]:
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


def process_table() -> dict[int, tuple[int, int]]:
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
    table = process_table()
    members = {pid for pid, (_, pgid) in table.items() if pgid == root}
    if root in table:
        members.add(root)
    frontier = set(members)
    while frontier:
        children = {pid for pid, (ppid, _) in table.items() if ppid in frontier}
        frontier = children - members
        members |= frontier
    return members


def send_signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def terminate_tree(root: int, timeout: float, *, signal_group: bool) -> bool:
    """Stop ``root`` and everything it spawned: SIGTERM, wait, then SIGKILL what is left.

    With ``signal_group`` the whole tree gets SIGTERM at once (plain services in their own
    session); without it only ``root`` does, so it can shut its children down in order (a
    ``ray start --block`` drains its node), and leftovers get SIGTERM once ``root`` is gone.
    Returns False if SIGKILL was needed.
    """
    tree = process_tree(root)
    signalled = set(tree) if signal_group else {root}
    send_signal(signalled, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tree |= process_tree(root)
        remaining = alive(tree)
        if not remaining:
            return True
        if root not in remaining:
            stragglers = remaining - signalled
            send_signal(stragglers, signal.SIGTERM)
            signalled |= stragglers
        time.sleep(0.2)
    log.warning("pid %d did not stop within %.0fs; sending SIGKILL", root, timeout)
    send_signal(alive(tree), signal.SIGKILL)
    kill_deadline = time.monotonic() + 5
    while alive(tree) and time.monotonic() < kill_deadline:
        time.sleep(0.1)
    return False


def reset_signals() -> None:
    """Run in a child before exec: shells and supervisors that start us in the background may
    leave SIGINT/SIGTERM ignored, and ignored dispositions survive exec, so the service would
    then ignore our SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def live_pid(pid_file: Path, is_ours: Callable[[int], bool]) -> int | None:
    """The PID in ``pid_file`` if ``is_ours(pid)`` (PIDs get reused after a reboot or a crash),
    else None; a stale file is removed."""
    pid = read_pid(pid_file)
    if pid is None:
        return None
    if is_ours(pid):
        return pid
    pid_file.unlink(missing_ok=True)
    return None


def launch(argv: list[str], log_path: Path, pid_file: Path, *, cwd: Path,
           env: Mapping[str, str] | None = None, banner: str | None = None) -> int:
    """Start ``argv`` in its own session (stop signals reach its children through the process
    group), output appended to ``log_path``, its PID written to ``pid_file``."""
    for directory in (cwd, log_path.parent, pid_file.parent):
        directory.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_fh:
        if banner:
            log_fh.write(f"\n==== {time.strftime('%F %T')} {banner}\n".encode())
            log_fh.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            preexec_fn=reset_signals,
            start_new_session=True,
        )
    pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (OSError, urllib.error.URLError):
        return False


@dataclass
class Daemon:
    """A long-running process we launch in its own session and track by PID file
    (``.state/pids/<name>.pid``, output in ``.state/logs/<name>.log``)."""

    name: str
    argv: list[str]
    # Arguments that must appear in /proc/<pid>/cmdline for a recorded PID to count as ours.
    markers: list[str]
    env: dict[str, str] | None = None
    cwd: Path = REPO
    log: Path = field(init=False)
    pid_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = LOGS / f"{self.name}.log"
        self.pid_file = PIDS / f"{self.name}.pid"

    def _is_ours(self, pid: int) -> bool:
        args = cmdline(pid)
        return bool(args) and all(marker in args for marker in self.markers) and bool(alive({pid}))

    def pid(self) -> int | None:
        """PID of the running process, or None (a stale PID file is removed)."""
        return live_pid(self.pid_file, self._is_ours)

    def spawn(self) -> int:
        return launch(self.argv, self.log, self.pid_file, cwd=self.cwd, env=self.env,
                      banner=f"starting {self.name}")

    def stop(self, timeout: float = 30.0) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        terminate_tree(pid, timeout=timeout, signal_group=True)
        self.pid_file.unlink(missing_ok=True)
        return True
