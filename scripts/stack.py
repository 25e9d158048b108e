#!/usr/bin/env python3
"""Local "embedded" service stack for development, with no Docker.

Owns every process it starts and everything under ``<repo>/.state/`` (git-ignored):

=================  ===================================  ================================
service            process                              address (loopback only)
=================  ===================================  ================================
postgis            private PostgreSQL 15 + PostGIS      127.0.0.1:55432
s3                 SeaweedFS ``weed mini``              127.0.0.1:58333 (+ WEED_PORTS)
mongo              SecantusDB ``secantusd-py``          127.0.0.1:57017
ray                Ray head (``ray_cluster/local.py``)  127.0.0.1:56379-56388, :8265
dagster (opt-in)   dagster-daemon + dagster-webserver   127.0.0.1:3000
=================  ===================================  ================================

The head alone keeps the stack light on 2 cores; ``ray_cluster/local.py start --workers N``
adds worker nodes to it (56389-56465) and ``down`` stops them before the head.

Usage (from the repository root)::

    .venv/bin/python scripts/stack.py up [--dagster] [--dagster-module MOD]
    .venv/bin/python scripts/stack.py status [--dagster]
    .venv/bin/python scripts/stack.py down
    .venv/bin/python scripts/stack.py env        # prints the path of .state/stack.env

``up`` writes ``.state/stack.env`` (``export KEY='value'`` lines) for everything
else to source; secrets are generated once into ``.state/secrets.env``.
Every command is idempotent. Processes are stopped by the PIDs recorded in
``.state/pids/`` (whole process group / tree), never by name.
"""

from __future__ import annotations

import abc
import argparse
import hashlib
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # scripts/ is sys.path[0]; ray_cluster/ lives at the root
from ray_cluster import local as ray_local  # noqa: E402

STATE = REPO / ".state"
LOGS = STATE / "logs"
PIDS = STATE / "pids"
ENV_FILE = STATE / "stack.env"
SECRETS_FILE = STATE / "secrets.env"
DAGSTER_HOME = STATE / "dagster_home"
DAGSTER_ENABLED_MARKER = STATE / "dagster.enabled"
# Not resolved: the venv's bin/python is a symlink, its entry points sit next to it.
VENV_BIN = Path(sys.executable).parent

LOOPBACK = "127.0.0.1"
SHORT_HASH = hashlib.sha256(str(REPO).encode()).hexdigest()[:8]

PG_PORT = 55432
PG_DB = "spatial_compute"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_FALLBACK_ROOT = Path(f"/var/lib/postgresql/spatial-etl-{SHORT_HASH}")

S3_PORT = 58333
S3_BUCKETS = ("landing-zone", "data-lake", "etl-staging")
# Every port `weed mini` opens, moved off SeaweedFS defaults (8333, 9333, 9340,
# 8888, 23646, their +10000 gRPC twins). Some weed components (the admin's
# maintenance worker, for one) ignore -X.port.grpc and dial HTTP port + 10000,
# so each component keeps that convention: HTTP 4833x, gRPC 5833x. S3 is the
# exception (58333 is fixed and 68333 is not a port), so its gRPC port is explicit.
WEED_PORTS: dict[str, int] = {
    "s3.port": S3_PORT,
    "s3.port.grpc": 58334,
    "master.port": 48335,
    "master.port.grpc": 58335,
    "volume.port": 48336,
    "volume.port.grpc": 58336,
    "filer.port": 48337,
    "filer.port.grpc": 58337,
    "admin.port": 48338,
    "admin.port.grpc": 58338,
}

MONGO_PORT = 57017
# SecantusDB advertises itself as a one-node replica set named "secantus";
# directConnection skips replica-set discovery so no replicaSet= is needed.
MONGO_URI = f"mongodb://{LOOPBACK}:{MONGO_PORT}/?directConnection=true"

DAGSTER_PORT = 3000
DEFAULT_DAGSTER_MODULE = "etl_pipelines.definitions"

RAY_HEAD = ray_local.RayHead.in_state_root(STATE)


class StackError(RuntimeError):
    """A service failed to start, stop or answer; the message points at its log."""


def say(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------- files


def _quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def write_env_file(path: Path, values: Mapping[str, str], header: str) -> None:
    """Write ``export KEY='value'`` lines, readable by the owner only (values hold secrets)."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines += [f"export {key}={_quote(value)}" for key, value in values.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            words = words[1:]
        for word in words:
            key, sep, value = word.partition("=")
            if sep:
                values[key] = value
    return values


def load_secrets() -> dict[str, str]:
    """Credentials generated once and reused by every later ``up``."""
    current = read_env_file(SECRETS_FILE) if SECRETS_FILE.exists() else {}
    defaults = {
        "MINIO_ROOT_USER": lambda: "etl" + secrets.token_hex(8),
        "MINIO_ROOT_PASSWORD": lambda: secrets.token_hex(20),
        "POSTGRES_USER": lambda: "spatial_etl",
        "POSTGRES_PASSWORD": lambda: secrets.token_hex(16),
    }
    missing = {key: make() for key, make in defaults.items() if not current.get(key)}
    if missing:
        current.update(missing)
        write_env_file(
            SECRETS_FILE,
            current,
            "Local-only credentials generated by scripts/stack.py. Never commit.",
        )
    return current


def stack_env(creds: Mapping[str, str]) -> dict[str, str]:
    """What ``.state/stack.env`` exports."""
    env = {
        "DAGSTER_HOME": str(DAGSTER_HOME),
        "DAGSTER_WEBSERVER_URL": f"http://{LOOPBACK}:{DAGSTER_PORT}",
        "MINIO_ENDPOINT": f"{LOOPBACK}:{S3_PORT}",
        "MINIO_ROOT_USER": creds["MINIO_ROOT_USER"],
        "MINIO_ROOT_PASSWORD": creds["MINIO_ROOT_PASSWORD"],
        "MONGO_CONNECTION_STRING": MONGO_URI,
        "POSTGRES_HOST": LOOPBACK,
        "POSTGRES_PORT": str(PG_PORT),
        "POSTGRES_USER": creds["POSTGRES_USER"],
        "POSTGRES_PASSWORD": creds["POSTGRES_PASSWORD"],
        "POSTGRES_DB": PG_DB,
        "RAY_ADDRESS": RAY_HEAD.address,
        "RAY_DASHBOARD_URL": RAY_HEAD.dashboard_url,
        # not a contract variable: only the benchmarks use it, to compact volumes (untimed)
        "SEAWEEDFS_MASTER_URL": f"http://{LOOPBACK}:{WEED_PORTS['master.port']}",
    }
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and RAY_AUTH_MODE=disabled: drivers
    # must agree with the head, see ray_cluster/local.py for why.
    env.update({k: v for k, v in ray_local.RAY_ENV.items() if k != "RAY_USAGE_STATS_ENABLED"})
    return env


# ----------------------------------------------------------------------- processes


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


def _reset_signals() -> None:
    # Shells and supervisors that start us in the background may leave
    # SIGINT/SIGTERM ignored; ignored dispositions survive exec, so the
    # service would then ignore our SIGTERM. Runs in the child before exec.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.3, *, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Daemon:
    """A long-running process we launch in its own session and track by PID file."""

    name: str
    argv: list[str]
    # Arguments that must appear in /proc/<pid>/cmdline for a recorded PID to
    # count as ours (PIDs get reused after a reboot or a crash).
    markers: list[str]
    env: dict[str, str] | None = None
    cwd: Path = REPO
    log: Path = field(init=False)
    pid_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = LOGS / f"{self.name}.log"
        self.pid_file = PIDS / f"{self.name}.pid"

    def pid(self) -> int | None:
        """PID of the running process, or None (a stale PID file is removed)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        args = _cmdline(pid)
        if args and all(marker in args for marker in self.markers):
            if ray_local.alive({pid}):
                return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def spawn(self) -> int:
        LOGS.mkdir(parents=True, exist_ok=True)
        PIDS.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log_fh:
            log_fh.write(f"\n==== {time.strftime('%F %T')} starting {self.name}\n".encode())
            log_fh.flush()
            proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                preexec_fn=_reset_signals,
                start_new_session=True,  # own process group: stop signals reach children
            )
        self.pid_file.write_text(f"{proc.pid}\n")
        return proc.pid

    def stop(self, timeout: float = 30.0) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        ray_local.terminate_tree(pid, timeout=timeout, signal_group=True)
        self.pid_file.unlink(missing_ok=True)
        return True


# ------------------------------------------------------------------------ services


@dataclass
class Status:
    name: str
    pid: int | None
    address: str
    ready: bool
    log: Path


class Service(abc.ABC):
    """One component of the stack."""

    name: str
    address: str

    @abc.abstractmethod
    def spawn(self) -> bool:
        """Launch the service unless it runs already (without waiting); True if launched now."""

    @abc.abstractmethod
    def wait_ready(self) -> None:
        """Block until the readiness check passes; StackError (pointing at the log) if not."""

    @abc.abstractmethod
    def stop(self) -> bool:
        """Stop the service and wait for it to exit; False if it was not running."""

    @abc.abstractmethod
    def status(self) -> list[Status]:
        """One row per process, with a live readiness check."""


class Postgres(Service):
    """A private PostgreSQL 15 cluster; never the Debian ``main`` cluster on 5432.

    initdb/pg_ctl refuse to run as root, so as root they run as the ``postgres``
    user through ``runuser``; the data directory must then be traversable by
    that user (``.state/postgres`` normally, else a directory under
    /var/lib/postgresql, recorded in ``.state/postgres.location``).
    """

    name = "postgis"
    address = f"{LOOPBACK}:{PG_PORT}"
    location_file = STATE / "postgres.location"

    def __init__(self, creds: Mapping[str, str]) -> None:
        self.creds = creds
        self.as_root = os.geteuid() == 0
        self.os_user = "postgres" if self.as_root else pwd.getpwuid(os.geteuid()).pw_name

    # -- layout
    def root(self) -> Path:
        """Where the cluster lives (chosen on the first ``up``, see _choose_root)."""
        if self.location_file.exists():
            return Path(self.location_file.read_text().strip())
        return STATE / "postgres"

    @property
    def data(self) -> Path:
        return self.root() / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root() / "run"

    @property
    def log(self) -> Path:
        return self.root() / "postgres.log"

    def _run_pg(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """Run a PostgreSQL tool as the cluster owner (never check=True: callers decide)."""
        cmd = ["runuser", "-u", "postgres", "--", *argv] if self.as_root else list(argv)
        # cwd=/ : the tools chdir back to the caller's cwd, which the postgres
        # user may not be allowed to enter (noisy "could not change directory").
        return subprocess.run(cmd, cwd="/", check=False, **kwargs)

    def _make_dir(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if self.as_root:
            shutil.chown(path, "postgres", "postgres")
        path.chmod(0o700)

    def _usable(self, path: Path) -> bool:
        # The socket path "<root>/run/.s.PGSQL.55432" must fit in sun_path (107 bytes).
        if len(str(path / "run" / f".s.PGSQL.{PG_PORT}")) > 100:
            return False
        return self._run_pg(["test", "-x", str(path), "-a", "-w", str(path)]).returncode == 0

    def _choose_root(self) -> Path:
        preferred = STATE / "postgres"
        self._make_dir(preferred)
        root = preferred
        if not self._usable(preferred):
            preferred.rmdir()
            if not self.as_root:
                raise StackError(f"{preferred}: socket path too long or not writable")
            root = PG_FALLBACK_ROOT
            self._make_dir(root)
        self.location_file.write_text(f"{root}\n")
        return root

    # -- lifecycle
    def pid(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if ray_local.alive({pid}) else None

    def _running(self) -> bool:
        cmd = [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "status"]
        return self._run_pg(cmd, capture_output=True).returncode == 0

    def _initdb(self) -> None:
        say(f"  postgis: initdb {self.data}")
        self._make_dir(self.data)
        self._make_dir(self.socket_dir)
        initdb = [str(PG_BIN / "initdb"), "-D", str(self.data), "-U", self.os_user]
        initdb += ["-E", "UTF8", "--locale=C.UTF-8", "--auth-local=peer", "--auth-host=scram-sha-256"]
        result = self._run_pg(initdb, capture_output=True, text=True)
        if result.returncode != 0:
            raise StackError(f"initdb failed:\n{result.stderr.strip()}")

    def _write_conf(self) -> None:
        # Rewritten before every start and included last from postgresql.conf,
        # so these win over anything above them: loopback TCP only, and the
        # unix socket in our own directory instead of /var/run/postgresql.
        def quoted(value: object) -> str:
            return "'" + str(value).replace("'", "''") + "'"

        settings = {
            "listen_addresses": LOOPBACK,
            "port": PG_PORT,
            "unix_socket_directories": self.socket_dir,
        }
        conf = self.data / "stack.conf"
        conf.write_text(
            "# Managed by scripts/stack.py (rewritten on every `up`).\n"
            + "".join(f"{key} = {quoted(value)}\n" for key, value in settings.items())
        )
        main_conf = self.data / "postgresql.conf"
        include = "include_if_exists = 'stack.conf'"
        if include not in main_conf.read_text():
            with main_conf.open("a") as fh:
                fh.write(f"\n{include}\n")
        for path in (conf, main_conf):
            if self.as_root:
                shutil.chown(path, "postgres", "postgres")
            path.chmod(0o600)

    def _write_hba(self) -> None:
        # Superuser only over the private unix socket with peer auth (that is how
        # we provision); everyone else by password over loopback TCP only.
        hba = self.data / "pg_hba.conf"
        hba.write_text(
            "# Managed by scripts/stack.py (rewritten on every `up`).\n"
            f"local  all  {self.os_user}                 peer\n"
            "host   all  all          127.0.0.1/32  scram-sha-256\n"
        )
        if self.as_root:
            shutil.chown(hba, "postgres", "postgres")
        hba.chmod(0o600)

    def spawn(self) -> bool:
        if not self.location_file.exists():
            self._choose_root()
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        if self._running():
            return False
        if port_in_use(PG_PORT):
            raise StackError(f"port {PG_PORT} is in use by a process we did not start")
        self._make_dir(self.socket_dir)
        self._write_hba()
        LOGS.mkdir(parents=True, exist_ok=True)
        link = LOGS / "postgres.log"
        if not link.is_symlink():
            link.unlink(missing_ok=True)
            link.symlink_to(self.log)
        self._write_conf()
        # -w: PostgreSQL is up in about a second, and pg_ctl knows best whether
        # the postmaster it forked came up or died (postmaster.pid appears late).
        cmd = [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log)]
        cmd += ["-w", "-t", "60", "start"]
        result = self._run_pg(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise StackError(f"pg_ctl start failed ({result.stderr.strip()}); see {self.log}")
        return True

    def _psql(self, script: str, database: str = "postgres") -> subprocess.CompletedProcess[str]:
        cmd = [str(PG_BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1"]
        cmd += ["-h", str(self.socket_dir), "-p", str(PG_PORT), "-U", self.os_user]
        cmd += ["-d", database, "-f", "-"]
        # The script (with the password) goes through stdin, not argv (visible in ps).
        return self._run_pg(cmd, input=script, capture_output=True, text=True)

    def _provision(self) -> None:
        def lit(value: str) -> str:  # psql backslash-command quoting
            return "'" + value.replace("'", "''") + "'"

        # SUPERUSER, on purpose, for local development only: it matches the
        # docker compose image (whose POSTGRES_USER is a superuser), and PostGIS
        # is not a "trusted" extension, so tests/migrations that create a
        # scratch database with postgis (or postgis_raster, ...) need it.
        # The role is only reachable over 127.0.0.1 with a generated password.
        script = f"""
\\set role_name {lit(self.creds["POSTGRES_USER"])}
\\set role_password {lit(self.creds["POSTGRES_PASSWORD"])}
SELECT format('CREATE ROLE %I', :'role_name')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role_name') \\gexec
SELECT format('ALTER ROLE %I WITH LOGIN SUPERUSER PASSWORD %L', :'role_name', :'role_password') \\gexec
SELECT format('CREATE DATABASE %I OWNER %I', '{PG_DB}', :'role_name')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{PG_DB}') \\gexec
\\connect {PG_DB}
CREATE EXTENSION IF NOT EXISTS postgis;
"""
        result = self._psql(script)
        if result.returncode != 0:
            raise StackError(f"provisioning failed:\n{result.stderr.strip()}\nsee {self.log}")

    def check(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(
                host=LOOPBACK,
                port=PG_PORT,
                user=self.creds["POSTGRES_USER"],
                password=self.creds["POSTGRES_PASSWORD"],
                dbname=PG_DB,
                connect_timeout=3,
            ) as conn:
                return conn.execute("SELECT postgis_full_version()").fetchone() is not None
        except psycopg.Error:
            return False

    def wait_ready(self) -> None:
        # spawn() already waited for "accepting connections" (pg_ctl -w).
        if not self._running():
            raise StackError(f"postgres is not running; see {self.log}")
        self._provision()
        if not self.check():
            raise StackError(f"SELECT postgis_full_version() over {self.address} failed; see {self.log}")
        # postmaster.pid stays authoritative; this copy puts every service's
        # PID in one place for people and tests (see tests/integration).
        PIDS.mkdir(parents=True, exist_ok=True)
        (PIDS / "postgis.pid").write_text(f"{self.pid()}\n")

    def stop(self) -> bool:
        (PIDS / "postgis.pid").unlink(missing_ok=True)
        if not (self.data / "PG_VERSION").exists() or not self._running():
            return False
        pg_ctl = [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-t", "30", "stop"]
        for mode in ("fast", "immediate"):
            if self._run_pg([*pg_ctl, "-m", mode], capture_output=True).returncode == 0:
                return True
        pid = self.pid()
        if pid is not None:
            ray_local.terminate_tree(pid, timeout=10, signal_group=False)
        return True

    def status(self) -> list[Status]:
        pid = self.pid()
        return [Status(self.name, pid, self.address, pid is not None and self.check(), self.log)]


class SeaweedS3(Service):
    """S3 API from SeaweedFS ``weed mini`` (master, volume, filer, S3 and admin in one process).

    Not configurable: weed also creates ``/tmp/seaweedfs-<component>-grpc-<port>.sock``
    (hard-coded path); the names carry our non-default ports, so they do not
    clash, and weed removes them on a clean exit (``down`` removes leftovers).
    """

    name = "s3"
    address = f"{LOOPBACK}:{S3_PORT}"
    root = STATE / "s3"

    def __init__(self, creds: Mapping[str, str]) -> None:
        self.creds = creds
        weed = VENV_BIN / "weed"
        argv = [str(weed), f"-logdir={self.root / 'logs'}", "mini", f"-dir={self.root / 'data'}"]
        argv += [f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}"]
        argv += [f"-{flag}={port}" for flag, port in WEED_PORTS.items()]
        argv += [
            # Components we do not use: off rather than listening on more ports.
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-admin.ui=false",
            "-master.telemetry=false",  # on by default: reports to seaweedfs.com
            "-s3.allowDeleteBucketNotEmpty=false",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            f"-s3.localSocket={self.root / 's3.sock'}",
        ]
        # A minimal environment on purpose: weed also reads S3_BUCKET,
        # S3_TABLE_BUCKET, S3_EXTERNAL_URL... from it. The admin identity comes
        # from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", str(self.root)),
            "AWS_ACCESS_KEY_ID": creds["MINIO_ROOT_USER"],
            "AWS_SECRET_ACCESS_KEY": creds["MINIO_ROOT_PASSWORD"],
        }
        self.daemon = Daemon("s3", argv, markers=["mini", f"-s3.port={S3_PORT}"], env=env, cwd=self.root)

    def _client(self):  # -> botocore S3 client (untyped)
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=f"http://{self.address}",
            aws_access_key_id=self.creds["MINIO_ROOT_USER"],
            aws_secret_access_key=self.creds["MINIO_ROOT_PASSWORD"],
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=2,
                read_timeout=5,
                retries={"max_attempts": 1},
            ),
        )

    def spawn(self) -> bool:
        if self.daemon.pid() is not None:
            return False
        # Give a weed that is still shutting down a moment to release its ports.
        deadline = time.monotonic() + 5
        while busy := [port for port in WEED_PORTS.values() if port_in_use(port)]:
            if time.monotonic() > deadline:
                raise StackError(f"s3: ports {busy} are in use by processes we did not start")
            time.sleep(0.5)
        for sub in ("data", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.daemon.spawn()
        return True

    def _healthy(self) -> bool:
        return http_ok(f"http://{self.address}/healthz")

    def _ensure_buckets(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._client()
        deadline = time.monotonic() + 20
        while True:
            try:
                existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                for bucket in S3_BUCKETS:
                    if bucket not in existing:
                        client.create_bucket(Bucket=bucket)
                existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                if existing.issuperset(S3_BUCKETS):
                    return
            except (BotoCoreError, ClientError) as exc:
                # Right after /healthz the filer may still be settling.
                if time.monotonic() > deadline:
                    raise StackError(f"s3 buckets: {exc}; see {self.daemon.log}") from exc
            if time.monotonic() > deadline:
                raise StackError(f"s3 buckets not visible after 20s; see {self.daemon.log}")
            time.sleep(0.5)

    def wait_ready(self) -> None:
        # A quick down/up can find a port still held by the previous instance:
        # weed then exits at once, and a retry after a short pause succeeds.
        for attempt in range(1, 4):
            deadline = time.monotonic() + 60
            while self.daemon.pid() is not None and not self._healthy():
                if time.monotonic() > deadline:
                    raise StackError(f"s3 /healthz not answering after 60s; see {self.daemon.log}")
                time.sleep(0.3)
            if self.daemon.pid() is not None:
                break
            if attempt == 3:
                raise StackError(f"weed exited during startup (3 attempts); see {self.daemon.log}")
            say(f"  s3: weed exited during startup, retrying ({attempt}/3)")
            time.sleep(2 * attempt)
            self.daemon.spawn()
        self._ensure_buckets()

    def check(self) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        if not self._healthy():
            return False
        try:
            names = {b["Name"] for b in self._client().list_buckets().get("Buckets", [])}
        except (BotoCoreError, ClientError):
            return False
        return names.issuperset(S3_BUCKETS)

    def stop(self) -> bool:
        stopped = self.daemon.stop(timeout=30)
        for component in ("master", "volume", "filer", "s3", "admin"):
            port = WEED_PORTS[f"{component}.port.grpc"]
            Path(f"/tmp/seaweedfs-{component}-grpc-{port}.sock").unlink(missing_ok=True)
        return stopped

    def status(self) -> list[Status]:
        pid = self.daemon.pid()
        return [Status(self.name, pid, self.address, pid is not None and self.check(), self.daemon.log)]


class Mongo(Service):
    """MongoDB wire protocol from SecantusDB (WiredTiger storage under .state/mongo)."""

    name = "mongo"
    address = f"{LOOPBACK}:{MONGO_PORT}"
    root = STATE / "mongo"

    def __init__(self) -> None:
        config = self.root / "secantusd.toml"
        data = self.root / "data"
        argv = [str(VENV_BIN / "secantusd-py"), "--config", str(config)]
        argv += ["--host", LOOPBACK, "--port", str(MONGO_PORT), "--storage-path", str(data)]
        argv += ["--cache-size", "256M"]  # default 1G is more than a dev box needs
        self.config = config
        self.daemon = Daemon("mongo", argv, markers=["--storage-path", str(data)], cwd=self.root)

    def spawn(self) -> bool:
        if self.daemon.pid() is not None:
            return False
        if port_in_use(MONGO_PORT):
            raise StackError(f"port {MONGO_PORT} is in use by a process we did not start")
        self.root.mkdir(parents=True, exist_ok=True)
        # An explicit --config turns off auto-discovery of ./secantusd.toml,
        # ~/.secantus/ and /etc/secantus/, which could otherwise switch on auth
        # or TLS behind our back. The flags repeat the values for `ps` readers.
        self.config.write_text(
            "# Written by scripts/stack.py\n[server]\n"
            f"host = {json.dumps(LOOPBACK)}\nport = {MONGO_PORT}\n"
            f"storage_path = {json.dumps(str(self.root / 'data'))}\n"  # JSON strings are TOML strings
        )
        self.daemon.spawn()
        return True

    def check(self) -> bool:
        import pymongo
        from pymongo.errors import PyMongoError

        client: pymongo.MongoClient = pymongo.MongoClient(
            MONGO_URI, serverSelectionTimeoutMS=2000, connectTimeoutMS=2000
        )
        try:
            return client.admin.command("ping").get("ok") == 1.0
        except PyMongoError:
            return False
        finally:
            client.close()

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.daemon.pid() is None:
                raise StackError(f"secantusd exited during startup; see {self.daemon.log}")
            return self.check()

        try:
            wait_until(ready, 60, interval=0.5, what=f"mongo ping on {self.address}")
        except StackError as exc:
            raise StackError(f"{exc}; see {self.daemon.log}") from exc

    def stop(self) -> bool:
        # WiredTiger checkpoints on SIGTERM; that takes a few seconds.
        return self.daemon.stop(timeout=30)

    def status(self) -> list[Status]:
        pid = self.daemon.pid()
        return [Status(self.name, pid, self.address, pid is not None and self.check(), self.daemon.log)]


class Ray(Service):
    """The Ray head; the lifecycle lives in ray_cluster/local.py."""

    name = "ray"
    address = f"{RAY_HEAD.address} (dashboard {RAY_HEAD.dashboard_url})"

    def spawn(self) -> bool:
        if ray_local.running_pid(RAY_HEAD) is not None:
            return False
        try:
            ray_local.start(RAY_HEAD)
        except ray_local.RayHeadError as exc:
            raise StackError(f"{exc}; see {RAY_HEAD.log_path}") from exc
        return True

    def wait_ready(self) -> None:
        try:
            ray_local.wait_until_ready(RAY_HEAD, timeout=120)
        except ray_local.RayHeadError as exc:
            raise StackError(str(exc)) from exc

    def stop(self) -> bool:
        return ray_local.stop(RAY_HEAD)

    def status(self) -> list[Status]:
        pid = ray_local.running_pid(RAY_HEAD)
        ready = pid is not None and ray_local.is_ready(RAY_HEAD)
        return [Status(self.name, pid, self.address, ready, RAY_HEAD.log_path)]


DAGSTER_YAML = """\
# Generated by scripts/stack.py on every `up --dagster`: a local SQLite
# instance. (The dagster.yaml at the repository root is for docker compose.)
storage:
  sqlite:
    base_dir: {home}/storage
local_artifact_storage:
  module: dagster._core.storage.root
  class: LocalArtifactStorage
  config:
    base_dir: {home}
telemetry:
  enabled: false
nux:
  enabled: false
"""


class Dagster(Service):
    """dagster-daemon + dagster-webserver on the SQLite instance in .state/dagster_home."""

    name = "dagster"
    address = f"http://{LOOPBACK}:{DAGSTER_PORT}"

    def __init__(self, module: str, env: Mapping[str, str]) -> None:
        self.module = module
        full_env = {**os.environ, **env, "DAGSTER_HOME": str(DAGSTER_HOME)}
        self.daemon = Daemon(
            "dagster-daemon",
            [str(VENV_BIN / "dagster-daemon"), "run", "-m", module],
            markers=[str(VENV_BIN / "dagster-daemon"), "run"],
            env=full_env,
        )
        self.webserver = Daemon(
            "dagster-webserver",
            [str(VENV_BIN / "dagster-webserver"), "-m", module] + ["-h", LOOPBACK, "-p", str(DAGSTER_PORT)],
            markers=[str(VENV_BIN / "dagster-webserver"), "-p", str(DAGSTER_PORT)],
            env=full_env,
        )

    def spawn(self) -> bool:
        DAGSTER_HOME.mkdir(parents=True, exist_ok=True)
        (DAGSTER_HOME / "dagster.yaml").write_text(DAGSTER_YAML.format(home=DAGSTER_HOME))
        DAGSTER_ENABLED_MARKER.write_text(f"{self.module}\n")
        launched = False
        if self.daemon.pid() is None:
            self.daemon.spawn()
            launched = True
        if self.webserver.pid() is None:
            if port_in_use(DAGSTER_PORT):
                raise StackError(f"port {DAGSTER_PORT} is in use by a process we did not start")
            self.webserver.spawn()
            launched = True
        return launched

    def running_module(self) -> str | None:
        """The code location module of the running daemon/webserver, if any runs."""
        for daemon in (self.daemon, self.webserver):
            pid = daemon.pid()
            if pid is not None:
                args = _cmdline(pid)
                return args[args.index("-m") + 1]
        return None

    def _webserver_ok(self) -> bool:
        return http_ok(f"{self.address}/server_info")

    def wait_ready(self) -> None:
        def ready() -> bool:
            for daemon in (self.daemon, self.webserver):
                if daemon.pid() is None:
                    raise StackError(f"{daemon.name} exited during startup; see {daemon.log}")
            return self._webserver_ok()

        # Loading the code location imports the whole ETL stack: can be slow.
        try:
            wait_until(ready, 180, interval=1.0, what=f"{self.address}/server_info")
        except StackError as exc:
            raise StackError(f"{exc}; see {self.webserver.log}") from exc

    def stop(self) -> bool:
        stopped = [daemon.stop(timeout=30) for daemon in (self.webserver, self.daemon)]
        DAGSTER_ENABLED_MARKER.unlink(missing_ok=True)
        return any(stopped)

    def status(self) -> list[Status]:
        daemon_pid = self.daemon.pid()
        web_pid = self.webserver.pid()
        return [
            Status(
                "dagster-webserver",
                web_pid,
                self.address,
                bool(web_pid) and self._webserver_ok(),
                self.webserver.log,
            ),
            Status(
                "dagster-daemon", daemon_pid, f"-m {self.module}", daemon_pid is not None, self.daemon.log
            ),
        ]


# ------------------------------------------------------------------------ commands


def _dagster_module(args: argparse.Namespace) -> str:
    if args.dagster_module:
        return args.dagster_module
    if DAGSTER_ENABLED_MARKER.exists():
        return DAGSTER_ENABLED_MARKER.read_text().strip()
    return os.environ.get("STACK_DAGSTER_MODULE", DEFAULT_DAGSTER_MODULE)


def core_services(creds: Mapping[str, str]) -> list[Service]:
    return [Postgres(creds), SeaweedS3(creds), Mongo(), Ray()]


def cmd_up(args: argparse.Namespace) -> int:
    started = time.monotonic()
    STATE.mkdir(exist_ok=True)
    creds = load_secrets()
    env = stack_env(creds)
    write_env_file(ENV_FILE, env, "Local stack endpoints, written by scripts/stack.py up.")
    services = core_services(creds)
    # Launch everything first (each launch returns at once), then wait for each:
    # the services boot in parallel without threads in this process.
    failed: dict[str, StackError] = {}
    launched: list[Service] = []
    for service in sorted(services, key=lambda s: s.name != "ray"):  # Ray boots slowest
        try:
            say(f"{'starting' if service.spawn() else 'running '} {service.name}")
            launched.append(service)
        except StackError as exc:
            failed[service.name] = exc
    for service in services:
        if service not in launched:
            continue
        try:
            service.wait_ready()
            say(f"ready    {service.name:<8} {service.address}")
        except StackError as exc:
            failed[service.name] = exc
    if args.dagster and not failed:
        dagster = Dagster(_dagster_module(args), env)
        try:
            running = dagster.running_module()
            if running is not None and running != dagster.module:
                raise StackError(f"already running with -m {running}; run `down` first to switch")
            say(f"{'starting' if dagster.spawn() else 'running '} dagster (-m {dagster.module})")
            dagster.wait_ready()
            say(f"ready    dagster  {dagster.address}")
        except StackError as exc:
            failed["dagster"] = exc
    for name, exc in failed.items():
        say(f"ERROR {name}: {exc}")
    if failed:
        say("stack NOT ready (`scripts/stack.py down` stops what did start)")
        return 1
    say(f"stack up in {time.monotonic() - started:.1f}s; env: source {ENV_FILE}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    creds = (
        load_secrets()
        if SECRETS_FILE.exists()
        else dict.fromkeys(
            ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "POSTGRES_USER", "POSTGRES_PASSWORD"), ""
        )
    )
    services: list[Service] = [Dagster(_dagster_module(args), {}), *reversed(core_services(creds))]
    errors = 0
    for service in services:
        try:
            stopped = service.stop()
        except (StackError, OSError) as exc:
            say(f"ERROR stopping {service.name}: {exc}")
            errors += 1
            continue
        say(f"{'stopped' if stopped else 'not running'}  {service.name}")
    return 1 if errors else 0


def cmd_status(args: argparse.Namespace) -> int:
    if not SECRETS_FILE.exists():
        say(f"stack was never started ({SECRETS_FILE} missing): run scripts/stack.py up")
        return 1
    creds = load_secrets()
    services: list[Service] = core_services(creds)
    if args.dagster or DAGSTER_ENABLED_MARKER.exists():
        services.append(Dagster(_dagster_module(args), stack_env(creds)))
    rows = [row for service in services for row in service.status()]
    for row in rows:
        state = "ready" if row.ready else "DOWN"
        pid = str(row.pid) if row.pid else "-"
        hint = "" if row.ready else f"   log: {row.log}"
        say(f"{row.name:<18} pid {pid:<8} {row.address:<50} {state}{hint}")
    return 0 if all(row.ready for row in rows) else 1


def cmd_env(_: argparse.Namespace) -> int:
    say(str(ENV_FILE))
    if not ENV_FILE.exists():
        print("(missing: run scripts/stack.py up first)", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Local embedded service stack (127.0.0.1 only).")
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--dagster", action="store_true", help="also run dagster daemon+webserver")
    parser.add_argument(
        "--dagster-module",
        help=f"code location module (default: $STACK_DAGSTER_MODULE or {DEFAULT_DAGSTER_MODULE})",
    )
    args = parser.parse_args(argv)
    commands = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "env": cmd_env}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
