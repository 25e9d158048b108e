"""S3: SeaweedFS ``weed mini`` (master, volume, filer, S3 and admin in one process) on
127.0.0.1:58333 with the three buckets, spoken to exactly as to MinIO, and its identities:
the same four as the compose stack's MinIO, each granted by the committed IAM policy in
``deploy/s3-policies/`` (see its README for what each may do)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from devstack.envfile import read_env_file
from devstack.layout import ADMIN_ENV_FILE, LOOPBACK, REPO, STATE, VENV_BIN
from devstack.procs import Daemon, http_ok, port_in_use
from devstack.service import Service, StackError, Status, say

if TYPE_CHECKING:
    from libs.object_store import ObjectStoreSettings

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
#: Not a contract variable: only the benchmarks use it, to compact volumes (untimed).
SEAWEEDFS_MASTER_URL = f"http://{LOOPBACK}:{WEED_PORTS['master.port']}"

POLICY_DIR = REPO / "deploy" / "s3-policies"
#: Each identity's key pair in .state/stack.env (admin: .state/admin.env), and the policy
#: file that grants it (None: SeaweedFS' "Admin" action, for the stack itself and for tests
#: that plant what no other identity may). The contract's MINIO_ROOT_USER/PASSWORD carry the
#: PIPELINE identity.
S3_IDENTITIES: dict[str, tuple[str, str, str | None]] = {
    "pipeline": ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "pipeline.json"),
    "landing": ("LANDING_ACCESS_KEY", "LANDING_SECRET_KEY", "landing.json"),
    "lake-reader": ("LAKE_READER_ACCESS_KEY", "LAKE_READER_SECRET_KEY", "lake-reader.json"),
    "admin": ("S3_ADMIN_ACCESS_KEY", "S3_ADMIN_SECRET_KEY", None),
}


def store_settings(env: Mapping[str, str], identity: str) -> ObjectStoreSettings:
    """How to reach the stack's object store as ``identity`` (a key of ``S3_IDENTITIES``)."""
    from libs.object_store import ObjectStoreSettings

    access, secret, _ = S3_IDENTITIES[identity]
    if identity == "admin" and access not in env:  # kept apart from stack.env, see stack.py
        env = {**env, **read_env_file(ADMIN_ENV_FILE)}
    return ObjectStoreSettings(env["MINIO_ENDPOINT"], env[access], env[secret])


def identities_config(creds: Mapping[str, str]) -> str:
    """The ``-s3.config`` file: every identity with its keys and its attached IAM policy.

    Policies, not weed's legacy per-bucket actions: "Write:<bucket>" also grants
    DeleteObject, an IAM policy tells PutObject from DeleteObject.
    """
    identities, policies = [], []
    for name, (access, secret, policy_file) in S3_IDENTITIES.items():
        identity: dict = {"name": name,
                          "credentials": [{"accessKey": creds[access], "secretKey": creds[secret]}]}
        if policy_file is None:
            identity["actions"] = ["Admin"]
        else:
            identity["policyNames"] = [name]
            document = json.loads((POLICY_DIR / policy_file).read_text())
            policies.append({"name": name, "content": json.dumps(document)})
        identities.append(identity)
    return json.dumps({"identities": identities, "policies": policies}, indent=1) + "\n"


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
        self.identities_file = self.root / "identities.json"
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
        # Every identity, the admin too, comes from this file (written by spawn):
        # none from AWS_ACCESS_KEY_ID, which would add a second all-powerful one.
        argv.append(f"-s3.config={self.identities_file}")
        # A minimal environment on purpose: weed also reads S3_BUCKET,
        # S3_TABLE_BUCKET, S3_EXTERNAL_URL, AWS_ACCESS_KEY_ID... from it.
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", str(self.root)),
        }
        self.daemon = Daemon("s3", argv, markers=["mini", f"-s3.port={S3_PORT}"], env=env, cwd=self.root)

    def _client(self):  # -> botocore S3 client (untyped)
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=f"http://{self.address}",
            aws_access_key_id=self.creds[S3_IDENTITIES["admin"][0]],
            aws_secret_access_key=self.creds[S3_IDENTITIES["admin"][1]],
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=2,
                read_timeout=5,
                retries={"max_attempts": 1},
            ),
        )

    def spawn(self) -> bool:
        config = identities_config(self.creds)
        current = self.identities_file.read_text() if self.identities_file.exists() else None
        if self.daemon.pid() is not None:
            if current == config:
                return False
            # weed reads -s3.config at start only. A weed from an older devstack (one root
            # identity, no file) or with other keys would refuse the keys in stack.env.
            say("  s3: restarting weed to load the identities in stack.env")
            if not self.daemon.stop(timeout=30):
                raise StackError(f"s3: weed (pid {self.daemon.pid()}) did not stop; see {self.daemon.log}")
        # Give a weed that is still shutting down a moment to release its ports.
        deadline = time.monotonic() + 5
        while busy := [port for port in WEED_PORTS.values() if port_in_use(port)]:
            if time.monotonic() > deadline:
                raise StackError(f"s3: ports {busy} are in use by processes we did not start")
            time.sleep(0.5)
        for sub in ("data", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if current != config:  # secrets: readable by the owner only
            tmp = self.identities_file.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(config)
            os.replace(tmp, self.identities_file)
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
        for sock in self.grpc_sockets():
            sock.unlink(missing_ok=True)
        return stopped

    def status(self) -> list[Status]:
        pid = self.daemon.pid()
        return [Status(self.name, pid, self.address, pid is not None and self.check(), self.daemon.log)]

    def grpc_sockets(self) -> list[Path]:
        return [Path(f"/tmp/seaweedfs-{component}-grpc-{WEED_PORTS[f'{component}.port.grpc']}.sock")
                for component in ("master", "volume", "filer", "s3", "admin")]

    def state_paths(self) -> list[Path]:
        return [self.root, self.daemon.log, self.daemon.pid_file, *self.grpc_sockets()]
