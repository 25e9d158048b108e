"""Ledger resource: the MongoDB database ``spatial_etl``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr
from pymongo import MongoClient

from libs.errors import InputDataError, PinnedVersionChanged
from libs.ledger import DATABASE, Ledger, reexecution_hint
from libs.retry import RetryPolicy


class LedgerResource(ConfigurableResource):
    """Where manifests, runs and lineage are recorded."""

    connection_string: str = Field(description="MongoDB URI (MONGO_CONNECTION_STRING)")
    database: str = Field(default=DATABASE, description="database name")
    timeout_ms: int = Field(default=10_000, description="server selection timeout (ms): how "
                            "long one call waits for a reachable MongoDB")
    connect_timeout_ms: int = Field(default=5_000, gt=0, description="TCP connect timeout (ms)")
    socket_timeout_ms: int = Field(
        default=30_000, gt=0, description="how long one call waits for MongoDB's answer (ms); "
        "a ledger call reads or writes a few documents, so an answer this late means a dead "
        "server or network")
    retry_deadline_seconds: float = Field(
        default=30.0, gt=0, description="total time one ledger call may spend retrying "
        "(MongoDB unreachable, a reconnect, an election) before the step fails naming it")

    dagster_ui_url: str = Field(
        default="http://127.0.0.1:3000", description="the Dagster UI as users open it: failure "
        "messages link to the run there (<url>/runs/<run id>) to say how to re-execute it")

    _client: MongoClient | None = PrivateAttr(default=None)

    def run_url(self, run_id: str) -> str:
        """The run's page in the Dagster UI."""
        return f"{self.dagster_ui_url.rstrip('/')}/runs/{run_id}"

    @contextmanager
    def releasing_pins_on_bad_input(self, run_id: str, batch_id: str) -> Iterator[None]:
        """A landed file that cannot be used (``InputDataError``, except a pinned version
        that changed) fails the step with how to retry, and releases the batch's pins: the
        re-execution of all steps validates and pins the corrected files (docs/run-lifecycle.md)."""
        try:
            yield
        except PinnedVersionChanged:
            raise
        except InputDataError as exc:
            self.ledger.release_pins(batch_id, run_id, str(exc))
            raise InputDataError(f"{exc}\n{reexecution_hint(self.run_url(run_id), all_steps=True)}"
                                 ) from None

    def _connect(self) -> MongoClient:
        return MongoClient(self.connection_string, serverSelectionTimeoutMS=self.timeout_ms,
                           connectTimeoutMS=self.connect_timeout_ms,
                           socketTimeoutMS=self.socket_timeout_ms, tz_aware=True)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self._client = self._connect()

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def ledger(self) -> Ledger:
        if self._client is None:
            self._client = self._connect()
        return Ledger(self._client, self.database,
                      RetryPolicy(deadline=self.retry_deadline_seconds,
                                  call_timeout=self.timeout_ms / 1000))
