"""MongoDB wire protocol from SecantusDB (``secantusd-py``, WiredTiger storage under
``.state/mongo``) on 127.0.0.1:57017, with ``--auth`` (SCRAM-SHA-256, role-based access).

Two users, both created by the stack: an admin (``root`` on ``admin``, credentials in
``.state/admin.env`` only) and the pipeline's user (``readWrite`` on ``spatial_etl`` alone,
in ``MONGO_CONNECTION_STRING``). SecantusDB has no localhost exception, so the very first
``up`` starts it once without ``--auth`` to create the admin (as its ``--auth`` help says),
stops it and starts it with ``--auth``; every ``up`` then (re)creates the pipeline user as
the admin. SecantusDB enforces authentication and the built-in roles' actions per database
(docs/devstack.md, "MongoDB users", says what it does not).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from devstack.layout import LOOPBACK, STATE, VENV_BIN
from devstack.procs import Daemon, cmdline, port_in_use
from devstack.service import Service, StackError, Status, say, wait_until

MONGO_PORT = 57017
MONGO_DB = "spatial_etl"


def mongo_uri(user: str, password: str, auth_source: str = MONGO_DB) -> str:
    """The connection string of ``user`` (credentials are hex: URL-safe as they are).

    SecantusDB advertises itself as a one-node replica set named "secantus"; directConnection
    skips replica-set discovery so no replicaSet= is needed."""
    return (
        f"mongodb://{user}:{password}@{LOOPBACK}:{MONGO_PORT}/{MONGO_DB}"
        f"?authSource={auth_source}&directConnection=true"
    )


class Mongo(Service):
    """MongoDB wire protocol from SecantusDB (WiredTiger storage under .state/mongo)."""

    name = "mongo"
    address = f"{LOOPBACK}:{MONGO_PORT}"
    root = STATE / "mongo"

    def __init__(self, creds: Mapping[str, str]) -> None:
        self.creds = creds
        config = self.root / "secantusd.toml"
        data = self.root / "data"
        argv = [str(VENV_BIN / "secantusd-py"), "--config", str(config)]
        argv += ["--host", LOOPBACK, "--port", str(MONGO_PORT), "--storage-path", str(data)]
        argv += ["--cache-size", "256M"]  # default 1G is more than a dev box needs
        self.config = config
        self.admin_created = self.root / "admin-user.created"
        markers = ["--storage-path", str(data)]
        self.daemon = Daemon("mongo", [*argv, "--auth"], markers=markers, cwd=self.root)
        self.bootstrap = Daemon("mongo", argv, markers=markers, cwd=self.root)

    @property
    def uri(self) -> str:
        return mongo_uri(self.creds["MONGO_USER"], self.creds["MONGO_PASSWORD"])

    @property
    def admin_uri(self) -> str:
        return mongo_uri(self.creds["MONGO_ADMIN_USER"], self.creds["MONGO_ADMIN_PASSWORD"], "admin")

    def spawn(self) -> bool:
        pid = self.daemon.pid()
        if pid is not None:
            if "--auth" in cmdline(pid):
                return False
            say("  mongo: running without --auth (an older stack): restarting it with users")
            self.daemon.stop(timeout=30)
        if port_in_use(MONGO_PORT):
            raise StackError(f"port {MONGO_PORT} is in use by a process we did not start")
        self.root.mkdir(parents=True, exist_ok=True)
        # An explicit --config turns off auto-discovery of ./secantusd.toml,
        # ~/.secantus/ and /etc/secantus/, which could otherwise switch on TLS
        # behind our back. The flags repeat the values for `ps` readers.
        self.config.write_text(
            "# Written by devstack\n[server]\n"
            f"host = {json.dumps(LOOPBACK)}\nport = {MONGO_PORT}\n"
            f"storage_path = {json.dumps(str(self.root / 'data'))}\n"  # JSON strings are TOML strings
        )
        if not self.admin_created.exists():
            self._create_admin()
        self.daemon.spawn()
        return True

    def _create_admin(self) -> None:
        """Once per data directory: start without --auth on loopback, create the admin, stop."""
        import pymongo

        say("  mongo: first start: creating the admin user (without --auth, loopback only)")
        self.bootstrap.spawn()
        try:
            self._wait(f"mongodb://{LOOPBACK}:{MONGO_PORT}/?directConnection=true", self.bootstrap)
            client: pymongo.MongoClient = pymongo.MongoClient(
                f"mongodb://{LOOPBACK}:{MONGO_PORT}/?directConnection=true", serverSelectionTimeoutMS=5000
            )
            with client:
                admin = client.admin
                user = self.creds["MONGO_ADMIN_USER"]
                if admin.command("usersInfo", user)["users"]:
                    admin.command("updateUser", user, pwd=self.creds["MONGO_ADMIN_PASSWORD"])
                else:
                    admin.command(
                        "createUser",
                        user,
                        pwd=self.creds["MONGO_ADMIN_PASSWORD"],
                        roles=[{"role": "root", "db": "admin"}],
                    )
        finally:
            self.bootstrap.stop(timeout=30)
        self.admin_created.write_text("the admin user exists; later starts use --auth\n")

    def _ensure_pipeline_user(self) -> None:
        import pymongo

        user, password = self.creds["MONGO_USER"], self.creds["MONGO_PASSWORD"]
        roles = [{"role": "readWrite", "db": MONGO_DB}]
        client: pymongo.MongoClient = pymongo.MongoClient(self.admin_uri, serverSelectionTimeoutMS=5000)
        with client:
            db = client[MONGO_DB]
            if db.command("usersInfo", user)["users"]:
                db.command("updateUser", user, pwd=password, roles=roles)
            else:
                db.command("createUser", user, pwd=password, roles=roles)

    def check(self, uri: str | None = None) -> bool:
        """The pipeline user can authenticate and list spatial_etl's collections."""
        import pymongo
        from pymongo.errors import PyMongoError

        client: pymongo.MongoClient = pymongo.MongoClient(
            uri or self.uri, serverSelectionTimeoutMS=2000, connectTimeoutMS=2000
        )
        try:
            client[MONGO_DB].list_collection_names()
            return True
        except PyMongoError:
            return False
        finally:
            client.close()

    def _ping(self, uri: str) -> bool:
        import pymongo
        from pymongo.errors import PyMongoError

        client: pymongo.MongoClient = pymongo.MongoClient(uri, serverSelectionTimeoutMS=2000)
        try:
            return client.admin.command("ping").get("ok") == 1.0
        except PyMongoError:
            return False
        finally:
            client.close()

    def _wait(self, uri: str, daemon: Daemon) -> None:
        def ready() -> bool:
            if daemon.pid() is None:
                raise StackError(f"secantusd exited during startup; see {daemon.log}")
            return self._ping(uri)

        try:
            wait_until(ready, 60, interval=0.5, what=f"mongo ping on {self.address}")
        except StackError as exc:
            raise StackError(f"{exc}; see {daemon.log}") from exc

    def wait_ready(self) -> None:
        self._wait(f"mongodb://{LOOPBACK}:{MONGO_PORT}/?directConnection=true", self.daemon)
        self._ensure_pipeline_user()
        if not self.check():
            raise StackError(
                f"the pipeline user cannot read {MONGO_DB} on {self.address}; see {self.daemon.log}"
            )

    def stop(self) -> bool:
        # WiredTiger checkpoints on SIGTERM; that takes a few seconds.
        return self.daemon.stop(timeout=30)

    def status(self) -> list[Status]:
        pid = self.daemon.pid()
        return [Status(self.name, pid, self.address, pid is not None and self.check(), self.daemon.log)]

    def state_paths(self) -> list[Path]:
        return [self.root, self.daemon.log, self.daemon.pid_file]
