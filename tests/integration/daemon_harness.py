"""A test's own Dagster: a code server (``dagster code-server start``, as devstack runs it)
and a daemon on a fresh instance whose dagster.yaml is devstack's plus what the test adds.

Tests that need the real daemon use it instead of the stack's ``up --dagster`` one, which
would also pick up the batches they land.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dagster import DagsterInstance

from devstack.dagster_local import DAGSTER_YAML, WORKSPACE_YAML
from devstack.layout import REPO
from devstack.procs import port_in_use, process_tree, reset_signals, send_signal, terminate_tree
from etl_pipelines.sensors.discovery import Position, write_cursor
from libs.manifest import MANIFEST_FILENAME
from libs.object_store import ObjectStore

DAGSTER_BIN = Path(sys.executable).parent


def wait_for(predicate: Callable, deadline_s: float, diagnose: Callable[[], str] = lambda: "",
             interval: float = 1.0):
    """Poll ``predicate`` until truthy (returned) or a generous deadline (a failed assert)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"gave up after {deadline_s:.0f}s\n{diagnose()}")


class OwnDagster:
    """Code server ``module`` on ``port`` and a daemon, on the instance in ``home``."""

    def __init__(self, home: Path, logs: Path, *, module: str, port: int,
                 env: dict[str, str] | None = None, extra_yaml: str = "") -> None:
        self.home, self.logs, self.module, self.port = home, logs, module, port
        home.mkdir()
        (home / "dagster.yaml").write_text(DAGSTER_YAML.format(home=home) + extra_yaml)
        (home / "workspace.yaml").write_text(WORKSPACE_YAML.format(host="127.0.0.1", port=port,
                                                                   module=module))
        # PYTHONPATH: a test's dagster.yaml may name a class of the tests package
        self.env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO),
                    **(env or {})}
        self.code_server: subprocess.Popen | None = None
        self.daemon: subprocess.Popen | None = None

    def _spawn(self, name: str, args: list) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        try:
            return subprocess.Popen(args, cwd=REPO, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, preexec_fn=reset_signals,
                                    start_new_session=True)
        finally:
            log.close()

    def log_tail(self, name: str = "daemon") -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def start_code_server(self, wait: bool = True) -> None:
        assert not port_in_use(self.port), f"port {self.port} is taken"
        self.code_server = self._spawn("code-server", [
            DAGSTER_BIN / "dagster", "code-server", "start", "-m", self.module,
            "--location-name", self.module, "-h", "127.0.0.1", "-p", str(self.port)])
        if wait:
            self.wait_for_code_server()

    def wait_for_code_server(self) -> None:
        wait_for(lambda: port_in_use(self.port), 180, lambda: self.log_tail("code-server"))

    def start_sensor(self, skip_existing_manifests_of: ObjectStore, focus: str,
                     sensor: str = "manifest_sensor") -> None:
        """Start ``sensor`` with every manifest already landed in its cursor and its listing
        position just before the keys under ``focus`` (the test's batch id, a prefix of every
        batch it lands): it reacts only to what the test lands, on its first tick, however
        many objects earlier tests left (a key sorting before a stored position would wait for
        the discovery sweep: docs/manifest-discovery.md)."""
        processed = {o.key: o.etag for o in skip_existing_manifests_of.list("landing-zone")
                     if o.key.endswith("/" + MANIFEST_FILENAME)}
        cursor = write_cursor(processed, Position(after=focus))
        for args in (["cursor", sensor, "--set", cursor], ["start", sensor]):
            subprocess.run([DAGSTER_BIN / "dagster", "sensor", *args, "-m", self.module],
                           cwd=REPO, env=self.env, check=True, capture_output=True, timeout=120)

    def start_daemon(self) -> subprocess.Popen:
        self.daemon = self._spawn("daemon", [DAGSTER_BIN / "dagster-daemon", "run", "-w",
                                             self.home / "workspace.yaml"])
        return self.daemon

    def start(self, skip_existing_manifests_of: ObjectStore, focus: str) -> None:
        # The instance's storage is created here, first: the code server and the sensor CLI
        # creating its SQLite databases at once made the CLI fail in alembic's
        # get_current_revision (both stamped the schema version).
        DagsterInstance.from_config(str(self.home)).dispose()
        self.start_code_server(wait=False)  # it imports the location meanwhile (~15 s)
        self.start_sensor(skip_existing_manifests_of, focus)
        self.wait_for_code_server()
        self.start_daemon()

    def kill_code_server_tree(self) -> set[int]:
        """SIGKILL the code server and everything it spawned (its gRPC server, the run worker)
        at once: what a lost user-code container does to them."""
        tree = process_tree(self.code_server.pid)
        send_signal(tree, signal.SIGKILL)
        self.code_server.wait(timeout=30)
        return tree

    def stop_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            terminate_tree(self.daemon.pid, timeout=30, signal_group=True)
            self.daemon.wait()

    def stop(self) -> None:
        for proc in (self.daemon, self.code_server):
            if proc is not None and proc.poll() is None:
                terminate_tree(proc.pid, timeout=30, signal_group=True)
                proc.wait()
