"""MongoDB wire protocol from SecantusDB (``secantusd-py``, WiredTiger storage under
``.state/mongo``) on 127.0.0.1:57017, no auth: loopback only."""

from __future__ import annotations

import json
from pathlib import Path

from devstack.layout import LOOPBACK, STATE, VENV_BIN
from devstack.procs import Daemon, port_in_use
from devstack.service import Service, StackError, Status, wait_until

MONGO_PORT = 57017
# SecantusDB advertises itself as a one-node replica set named "secantus";
# directConnection skips replica-set discovery so no replicaSet= is needed.
MONGO_URI = f"mongodb://{LOOPBACK}:{MONGO_PORT}/?directConnection=true"


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
            "# Written by devstack\n[server]\n"
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

    def state_paths(self) -> list[Path]:
        return [self.root, self.daemon.log, self.daemon.pid_file]
