"""The stack as a whole: its credentials and env file, and ``up``/``down``/``status`` over
every service. Every command is idempotent; processes are stopped by the PIDs recorded in
``.state/pids/`` (whole process tree), never by name."""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from devstack.dagster_local import DAGSTER_PORT, DEFAULT_DAGSTER_MODULE, Dagster
from devstack.envfile import read_env_file, write_env_file
from devstack.layout import (
    ADMIN_ENV_FILE,
    DAGSTER_ENABLED_MARKER,
    DAGSTER_HOME,
    ENV_FILE,
    LOGS,
    LOOPBACK,
    PIDS,
    STATE,
)
from devstack.mongo import Mongo, mongo_uri
from devstack.postgis import PG_DB, PG_PORT, Postgres
from devstack.ray_layout import RAY_ENV
from devstack.ray_nodes import STACK_HEAD, RayService
from devstack.s3 import S3_IDENTITIES, S3_PORT, SEAWEEDFS_MASTER_URL, SeaweedS3
from devstack.service import Service, StackError, say

# Generated on the first `up`, kept in the env file and reused by every later `up`; a key
# an older env file lacks is generated then (upgrade in place). Object store identities: see
# devstack/s3.py S3_IDENTITIES; MINIO_ROOT_USER/PASSWORD carry the PIPELINE identity, not root.
CREDENTIALS = {
    "MINIO_ROOT_USER": lambda: "etl" + secrets.token_hex(8),
    "MINIO_ROOT_PASSWORD": lambda: secrets.token_hex(20),
    "LANDING_ACCESS_KEY": lambda: "landing" + secrets.token_hex(8),
    "LANDING_SECRET_KEY": lambda: secrets.token_hex(20),
    "LAKE_READER_ACCESS_KEY": lambda: "reader" + secrets.token_hex(8),
    "LAKE_READER_SECRET_KEY": lambda: secrets.token_hex(20),
    "POSTGRES_USER": lambda: "spatial_etl",
    "POSTGRES_PASSWORD": lambda: secrets.token_hex(16),
    # readWrite on spatial_etl only (devstack/mongo.py)
    "MONGO_USER": lambda: "spatial_etl",
    "MONGO_PASSWORD": lambda: secrets.token_hex(16),
    # every Ray node and driver carries it (devstack/ray_layout.py); Ray's own format
    "RAY_AUTH_TOKEN": lambda: secrets.token_hex(32),
}
# Admin identities the stack itself uses to create the ones above: kept apart, in
# .state/admin.env, so nothing that sources stack.env (drivers, Dagster, tests) holds them.
# (PostGIS needs none: its admin is the cluster's superuser over a peer-authenticated socket.)
ADMIN_CREDENTIALS = {
    "S3_ADMIN_ACCESS_KEY": lambda: "s3admin" + secrets.token_hex(8),
    "S3_ADMIN_SECRET_KEY": lambda: secrets.token_hex(20),
    "MONGO_ADMIN_USER": lambda: "stack_admin",
    "MONGO_ADMIN_PASSWORD": lambda: secrets.token_hex(20),
}
# The stack's own entries of .state/ (benchmark outputs and caches there are not the stack's).
# secrets.env held the credentials before they moved into stack.env.
STACK_FILES = (ENV_FILE, ADMIN_ENV_FILE, STATE / "secrets.env", LOGS, PIDS)


def credentials() -> dict[str, str]:
    """The credentials in the env files, plus any missing ones generated now (an env file of
    an older stack gains the new ones in place on the next ``up``)."""
    current = {}
    for path in (ENV_FILE, ADMIN_ENV_FILE):
        current.update(read_env_file(path) if path.exists() else {})
    return {key: current.get(key) or make()
            for key, make in {**CREDENTIALS, **ADMIN_CREDENTIALS}.items()}


def stack_env(creds: Mapping[str, str]) -> dict[str, str]:
    """What ``.state/stack.env`` exports: the contract's variables and the credentials."""
    env = {
        "DAGSTER_HOME": str(DAGSTER_HOME),
        "DAGSTER_WEBSERVER_URL": f"http://{LOOPBACK}:{DAGSTER_PORT}",
        "MINIO_ENDPOINT": f"{LOOPBACK}:{S3_PORT}",
        # The pipeline's identity (the contract's names); the others for clients and tests.
        **{key: creds[key] for name, pair in S3_IDENTITIES.items() if name != "admin"
           for key in pair[:2]},
        "MONGO_CONNECTION_STRING": mongo_uri(creds["MONGO_USER"], creds["MONGO_PASSWORD"]),
        "POSTGRES_HOST": LOOPBACK,
        "POSTGRES_PORT": str(PG_PORT),
        "POSTGRES_USER": creds["POSTGRES_USER"],
        "POSTGRES_PASSWORD": creds["POSTGRES_PASSWORD"],
        "POSTGRES_DB": PG_DB,
        "MONGO_USER": creds["MONGO_USER"],
        "MONGO_PASSWORD": creds["MONGO_PASSWORD"],
        "RAY_ADDRESS": STACK_HEAD.address,
        "RAY_AUTH_TOKEN": creds["RAY_AUTH_TOKEN"],
        "RAY_DASHBOARD_URL": STACK_HEAD.dashboard_url,
        "SEAWEEDFS_MASTER_URL": SEAWEEDFS_MASTER_URL,
    }
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and RAY_AUTH_MODE=token: drivers
    # must agree with the head, see devstack/ray_layout.py for why.
    env.update({k: v for k, v in RAY_ENV.items() if k != "RAY_USAGE_STATS_ENABLED"})
    return env


def dagster_module(requested: str | None = None) -> str:
    """The code location module: as requested, else the one the running Dagster was started
    with, else $STACK_DAGSTER_MODULE, else etl_pipelines.definitions."""
    if requested:
        return requested
    if DAGSTER_ENABLED_MARKER.exists():
        return DAGSTER_ENABLED_MARKER.read_text().strip()
    return os.environ.get("STACK_DAGSTER_MODULE", DEFAULT_DAGSTER_MODULE)


def core_services(creds: Mapping[str, str]) -> list[Service]:
    return [Postgres(creds), SeaweedS3(creds), Mongo(creds), RayService()]


def up(*, with_dagster: bool = False, module: str | None = None) -> int:
    started = time.monotonic()
    STATE.mkdir(exist_ok=True)
    creds = credentials()
    env = stack_env(creds)
    write_env_file(ENV_FILE, env, "Local stack endpoints and local-only credentials (generated once),\n"
                   "written by `python -m devstack up`. Never commit.")
    write_env_file(ADMIN_ENV_FILE, {key: creds[key] for key in ADMIN_CREDENTIALS},
                   "The stack's admin identities (devstack only; never exported to the pipeline).")
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
    if with_dagster and not failed:
        dagster = Dagster(dagster_module(module), env)
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
        say("stack NOT ready (`python -m devstack down` stops what did start)")
        return 1
    say(f"stack up in {time.monotonic() - started:.1f}s; env: source {ENV_FILE}")
    return 0


def down(*, purge: bool = False) -> int:
    """Stop every service (Dagster first); with ``purge`` also remove all of the stack's state."""
    creds = read_env_file(ENV_FILE) if ENV_FILE.exists() else {}
    creds = {key: creds.get(key, "") for key in {**CREDENTIALS, **ADMIN_CREDENTIALS}}
    services: list[Service] = [Dagster(dagster_module(), {}), *reversed(core_services(creds))]
    errors = 0
    for service in services:
        try:
            stopped = service.stop()
        except (StackError, OSError) as exc:
            say(f"ERROR stopping {service.name}: {exc}")
            errors += 1
            continue
        say(f"{'stopped' if stopped else 'not running'}  {service.name}")
    if purge:
        if errors:
            say("not purging: a service did not stop")
            return 1
        paths = [path for service in services for path in service.state_paths()]
        for path in [*paths, *STACK_FILES]:
            _remove(path)
        if STATE.is_dir() and not any(STATE.iterdir()):
            STATE.rmdir()
        say(f"purged   every file of the stack ({STATE}, {STACK_HEAD.temp_dir})")
    return 1 if errors else 0


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def status(*, with_dagster: bool = False) -> int:
    if not ENV_FILE.exists():
        say(f"stack was never started ({ENV_FILE} missing): run `python -m devstack up`")
        return 1
    creds = credentials()
    services: list[Service] = core_services(creds)
    if with_dagster or DAGSTER_ENABLED_MARKER.exists():
        services.append(Dagster(dagster_module(), stack_env(creds)))
    rows = [row for service in services for row in service.status()]
    for row in rows:
        state = "ready" if row.ready else "DOWN"
        pid = str(row.pid) if row.pid else "-"
        hint = "" if row.ready else f"   log: {row.log}"
        say(f"{row.name:<20} pid {pid:<8} {row.address:<50} {state}{hint}")
    return 0 if all(row.ready for row in rows) else 1
