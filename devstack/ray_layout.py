"""How the local Ray cluster is laid out: ports, temp dir, PID and log files, and the
``ray start`` command lines of its head and worker nodes (nothing is started here).

A cluster takes a block of 100 ports from its GCS port ``P`` (the stack's is 56379, the
multi-node tests' 26479), so two clusters never clash and nothing falls back to Ray's
machine-wide defaults (52365, 44217/44227, 10001)::

    P+0 GCS   P+1 Ray Client   P+2 dashboard agent (HTTP)   P+3 autoscaler metrics
    P+4 dashboard metrics      P+5 head's Prometheus metrics export
    P+6 node manager   P+7 object manager   P+8 dashboard agent gRPC   P+9 runtime-env agent
    P+10*i + 0..5   worker i (1..8): node manager, object manager, metrics export,
                    dashboard agent HTTP, dashboard agent gRPC, runtime-env agent
    P+90            dashboard of a non-stack cluster (the stack's is 8265)

Every node of a cluster shares the head's temp dir (``/tmp/ray-<hash>``: Ray's unix sockets
under it must fit in 107 bytes, so it cannot live under the repository). docs/devstack.md
says why the worker nodes start through ``WORKER_LAUNCHER``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devstack.envfile import read_env_file
from devstack.layout import ENV_FILE, LOOPBACK, STATE

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
# The stack's head, as the stack has always started it. Ray's defaults (10001 for
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
    # Token auth on, decided explicitly. The token itself is the stack's (RAY_AUTH_TOKEN,
    # generated on the first `up` and kept in .state/stack.env); ray_env() adds it. With
    # RAY_AUTH_MODE unset, Ray 2.60 picks the mode implicitly (a bare `ray.init()` turns
    # token auth on and writes ~/.ray/auth_token, after which `ray start --head` enables it
    # while drivers given an address do not), so every head, node and driver of this stack
    # sets the mode and carries the token explicitly, and nothing reads ~/.ray. Even on
    # loopback the GCS, the client server and the dashboard's Jobs API run arbitrary code
    # for anyone who reaches them: another user, or a browser page via the dashboard.
    "RAY_AUTH_MODE": "token",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Retries of a task the memory monitor killed: Ray's default is unbounded; the owner
    # (the run's driver) counts them, the nodes get it too (docs/limits.md).
    "RAY_task_oom_retries": "2",
}

DRIVER_CHECK = textwrap.dedent(
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
WORKER_LAUNCHER = textwrap.dedent(
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
    def in_state_root(cls, state_root: Path = STATE) -> RayHead:
        """The stack's layout: ray/, pids/ray.pid, logs/ray.log under the state root."""
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
        return Path("/tmp") / f"ray-{hashlib.sha256(str(self.state_dir.resolve()).encode()).hexdigest()[:8]}"

    @property
    def process_tmp(self) -> Path:
        """TMPDIR of the cluster's processes, inside its temp dir: what they leave behind
        when stopped (multiprocessing's pymp-* dirs, for one) goes with the temp dir."""
        return self.temp_dir / "tmp"

    def node_env(self) -> dict[str, str]:
        """The environment of this cluster's ``ray start`` processes."""
        self.process_tmp.mkdir(parents=True, exist_ok=True)
        return {**ray_env(), "TMPDIR": str(self.process_tmp)}

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
        ``WORKER_LAUNCHER``, see there why)."""
        return [
            sys.executable,
            "-c",
            WORKER_LAUNCHER,
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


def stack_auth_token() -> str | None:
    """The stack's RAY_AUTH_TOKEN: from the environment, else from ``.state/stack.env``."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token and ENV_FILE.exists():
        token = read_env_file(ENV_FILE).get("RAY_AUTH_TOKEN")
    return token or None


def auth_headers(token: str | None = None) -> dict[str, str]:
    """The HTTP header the dashboard's API wants under token auth (none without a token)."""
    token = token or stack_auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def ray_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: ``os.environ``) plus the variables the local cluster needs, the
    stack's token included (a cluster started without one would refuse every driver)."""
    env = dict(os.environ if base is None else base)
    env.update(RAY_ENV)
    if not env.get("RAY_AUTH_TOKEN"):
        token = stack_auth_token()
        if token is None:
            raise RuntimeError(f"RAY_AUTH_MODE=token needs RAY_AUTH_TOKEN: none in the "
                               f"environment nor in {ENV_FILE}; run `python -m devstack up`")
        env["RAY_AUTH_TOKEN"] = token
    # A RAY_ADDRESS pointing elsewhere must not leak into `ray start --head`.
    env.pop("RAY_ADDRESS", None)
    return env

