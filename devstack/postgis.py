"""PostGIS: a private PostgreSQL 15 cluster on 127.0.0.1:55432, never Debian's ``main`` on 5432.

initdb/pg_ctl refuse to run as root, so as root they run as the ``postgres`` user through
``runuser``; the data directory must then be traversable by that user: ``.state/postgres``
normally, else (a checkout under a private home, or a path too long for the socket) a
directory under /var/lib/postgresql, recorded in ``.state/postgres.location`` and removed by
``down --purge``.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from devstack.layout import LOGS, LOOPBACK, PIDS, REPO, STATE
from devstack.procs import alive, port_in_use, terminate_tree
from devstack.service import Service, StackError, Status, say

PG_PORT = 55432
PG_DB = "spatial_compute"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
#: The admin step for the pipeline role, shared with the compose stack's initdb hook.
PIPELINE_ROLE_SQL = REPO / "deploy" / "postgis" / "pipeline-role.psql"
PG_FALLBACK_ROOT = Path("/var/lib/postgresql") / (
    "spatial-etl-" + hashlib.sha256(str(REPO).encode()).hexdigest()[:8])


class Postgres(Service):
    """The cluster's lifecycle: initdb once, rewrite its config on every start, provision the
    database, the pipeline's (non-superuser) role and the extension; stopped with ``pg_ctl stop``."""

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
        return pid if alive({pid}) else None

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
            "# Managed by devstack (rewritten on every `up`).\n"
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
            "# Managed by devstack (rewritten on every `up`).\n"
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
        """The admin step, as the cluster's superuser over the private socket: the database
        (owned by that superuser), the pipeline's non-superuser role, its grants and guards,
        and the postgis extension (deploy/postgis/pipeline-role.psql, shared with compose)."""
        def lit(value: str) -> str:  # psql backslash-command quoting
            return "'" + value.replace("'", "''") + "'"

        # The script (with the password) goes through stdin, not argv (visible in ps).
        script = f"""
SELECT format('CREATE DATABASE %I', '{PG_DB}')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{PG_DB}') \\gexec
\\connect {PG_DB}
\\set pipeline_user {lit(self.creds["POSTGRES_USER"])}
\\set pipeline_password {lit(self.creds["POSTGRES_PASSWORD"])}
{PIPELINE_ROLE_SQL.read_text()}
"""
        result = self._psql(script)
        if result.returncode != 0:
            raise StackError(f"provisioning failed:\n{result.stderr.strip()}\nsee {self.log}")

    def admin_sql(self, script: str) -> str:
        """Run ``script`` as the cluster's superuser in spatial_compute (tests check what the
        pipeline role may not do against objects only the admin can make); its output."""
        result = self._psql(script, database=PG_DB)
        if result.returncode != 0:
            raise StackError(f"admin SQL failed: {result.stderr.strip()}")
        return result.stdout

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
            terminate_tree(pid, timeout=10, signal_group=False)
        return True

    def status(self) -> list[Status]:
        pid = self.pid()
        return [Status(self.name, pid, self.address, pid is not None and self.check(), self.log)]

    def state_paths(self) -> list[Path]:
        return [self.root(), self.location_file, LOGS / "postgres.log", PIDS / "postgis.pid"]
