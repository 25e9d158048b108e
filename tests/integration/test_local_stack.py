"""Smoke test of the local embedded stack started by ``python -m devstack up``.

Checks each service through the endpoints published in ``.state/stack.env`` and
that nothing the stack listens on is reachable from outside the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest
from minio import Minio
from pymongo import MongoClient

from devstack.envfile import read_env_file
from devstack.layout import ENV_FILE, PIDS
from devstack.procs import process_tree

pytestmark = pytest.mark.integration

BUCKETS = {"landing-zone", "data-lake", "etl-staging"}
# Every fixed port of the stack: PostGIS, S3 (+ the other weed mini components:
# master, volume, filer, admin and their gRPC ports), MongoDB, Ray GCS, Ray
# Client server, dashboard agent, metrics, dashboard, Dagster code server and webserver.
STACK_PORTS = {
    55432,
    58333, 58334, 48335, 58335, 48336, 58336, 48337, 58337, 48338, 58338,
    57017,
    56379, 56380, 56381, 56382, 56383, 8265,
    56384, 56385, 56386, 56387, 56388,  # head node: metrics export, raylet, object manager, agents
    54000, 3000,
}  # fmt: skip
LOOPBACK_HOSTS = {"127.0.0.1", "::ffff:127.0.0.1"}


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    if not ENV_FILE.exists():
        pytest.fail(f"{ENV_FILE} is missing: run `python -m devstack up` first", pytrace=False)
    return read_env_file(ENV_FILE)


def test_postgis_answers_with_extension(env: dict[str, str]) -> None:
    assert env["POSTGRES_HOST"] == "127.0.0.1"
    with psycopg.connect(
        host=env["POSTGRES_HOST"],
        port=int(env["POSTGRES_PORT"]),
        user=env["POSTGRES_USER"],
        password=env["POSTGRES_PASSWORD"],
        dbname="spatial_compute",
        connect_timeout=5,
    ) as conn:
        ext = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'postgis'").fetchone()
        assert ext is not None, "postgis extension missing in spatial_compute"
        assert conn.execute("SELECT postgis_full_version()").fetchone()[0].startswith("POSTGIS=")
        # The private cluster, not the Debian `main` one on 5432.
        assert conn.execute("SHOW port").fetchone()[0] == env["POSTGRES_PORT"]
        assert conn.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"


def test_postgres_rejects_wrong_password(env: dict[str, str]) -> None:
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            host=env["POSTGRES_HOST"],
            port=int(env["POSTGRES_PORT"]),
            user=env["POSTGRES_USER"],
            password="not-the-password",
            dbname="spatial_compute",
            connect_timeout=5,
        ).close()


def test_s3_has_the_buckets(env: dict[str, str]) -> None:
    assert "://" not in env["MINIO_ENDPOINT"], "MINIO_ENDPOINT is host:port, no scheme"
    client = Minio(
        env["MINIO_ENDPOINT"],
        access_key=env["MINIO_ROOT_USER"],
        secret_key=env["MINIO_ROOT_PASSWORD"],
        secure=False,
    )
    assert BUCKETS <= {bucket.name for bucket in client.list_buckets()}


def test_mongo_ping(env: dict[str, str]) -> None:
    assert "replicaSet=" not in env["MONGO_CONNECTION_STRING"]
    client: MongoClient = MongoClient(env["MONGO_CONNECTION_STRING"], serverSelectionTimeoutMS=5000)
    try:
        assert client.admin.command("ping")["ok"] == 1.0
    finally:
        client.close()


def test_ray_task_round_trip(env: dict[str, str]) -> None:
    # In a subprocess: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import
    # time, and a driver in the pytest process would outlive this test.
    script = textwrap.dedent(
        """
        import os, ray
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, logging_level="ERROR")
        @ray.remote
        def square(x):
            return x * x
        print(sum(ray.get([square.remote(i) for i in range(4)], timeout=30)))
        ray.shutdown()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "14"


def test_ray_dashboard_answers_on_loopback(env: dict[str, str]) -> None:
    assert env["RAY_DASHBOARD_URL"] == "http://127.0.0.1:8265"
    request = urllib.request.Request(f"{env['RAY_DASHBOARD_URL']}/api/version",
                                     headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert json.loads(resp.read())["ray_version"]


@pytest.mark.parametrize("path", ["/api/version", "/api/jobs/", "/api/v0/nodes"])
def test_ray_dashboard_refuses_a_client_without_the_token(env: dict[str, str], path: str) -> None:
    url = f"{env['RAY_DASHBOARD_URL']}{path}"
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url, timeout=5)
    assert missing.value.code == 401
    wrong = urllib.request.Request(url, headers={"Authorization": f"Bearer {'0' * 64}"})
    with pytest.raises(urllib.error.HTTPError) as forbidden:
        urllib.request.urlopen(wrong, timeout=5)
    assert forbidden.value.code == 403
    right = urllib.request.Request(url, headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(right, timeout=5) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("token", ["wrong", "none"])
def test_ray_gcs_refuses_a_driver_without_the_token(env: dict[str, str], token: str,
                                                    tmp_path: Path) -> None:
    """A driver with a wrong token, or none at all (and an empty ~/.ray), cannot connect."""
    script = textwrap.dedent(
        """
        import os, ray
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, logging_level="ERROR")
        print("connected")
        ray.shutdown()
        """
    )
    driver_env = {**os.environ, **env, "HOME": str(tmp_path), "RAY_AUTH_MODE": "token"}
    if token == "wrong":
        driver_env["RAY_AUTH_TOKEN"] = "0" * 64
    else:
        driver_env.pop("RAY_AUTH_TOKEN")
    result = subprocess.run([sys.executable, "-c", script], env=driver_env, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode != 0 and "connected" not in result.stdout
    assert "authentication" in (result.stderr + result.stdout).lower(), result.stderr[-2000:]


def _listeners() -> list[tuple[str, int, set[int]]]:
    """(host, port, owning pids) for every listening TCP socket, from `ss -ltnp`."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        fields = line.split()
        host, _, port = fields[3].rpartition(":")
        pids = {int(part[4:]) for part in line.replace(",", " ").split() if part.startswith("pid=")}
        rows.append((host.strip("[]"), int(port), pids))
    return rows


def _our_pids() -> set[int]:
    """PIDs recorded by the stack plus all their descendants."""
    ours: set[int] = set()
    for pid_file in PIDS.glob("*.pid"):
        try:
            ours |= process_tree(int(pid_file.read_text().strip()))
        except ValueError:
            continue
    return ours


def test_nothing_listens_beyond_loopback(env: dict[str, str]) -> None:
    listeners = _listeners()
    ports = {port for _, port, _ in listeners}
    for required in (55432, 58333, 57017, 56379, 8265):
        assert required in ports, f"nothing listens on {required}"
    exposed = [
        (host, port) for host, port, _ in listeners if port in STACK_PORTS and host not in LOOPBACK_HOSTS
    ]
    assert not exposed, f"stack ports bound beyond loopback: {exposed}"
    # Also every socket of our processes, including Ray's randomly chosen ports
    # (needs `ss -p` to see the owners, i.e. root or the same user).
    ours = _our_pids()
    exposed = [(host, port) for host, port, pids in listeners if pids & ours and host not in LOOPBACK_HOSTS]
    assert not exposed, f"stack processes listen beyond loopback: {exposed}"


def test_bench_compaction_keeps_live_objects(env: dict[str, str], store) -> None:
    """The bench vacuums SeaweedFS between landing its batch and the timed run
    (``benchmarks.pipelines.compact_object_store``): the landed objects must survive it."""
    from benchmarks.pipelines import compact_object_store

    assert env["SEAWEEDFS_MASTER_URL"] == "http://127.0.0.1:48335"
    prefix = f"test-compaction-{os.getpid()}/"
    live, dead = os.urandom(3 << 20), os.urandom(5 << 20)
    try:
        store.put_bytes("etl-staging", f"{prefix}live", live, "application/octet-stream")
        store.put_bytes("etl-staging", f"{prefix}dead", dead, "application/octet-stream")
        store.client.remove_object("etl-staging", f"{prefix}dead")
        compact_object_store(env)
        assert store.get_bytes("etl-staging", f"{prefix}live") == live
        assert [o.key for o in store.list("etl-staging", prefix)] == [f"{prefix}live"]
    finally:
        store.delete_prefix("etl-staging", prefix)
