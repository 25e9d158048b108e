"""The ledger (MongoDB database ``spatial_etl``): manifests seen, batches claimed, runs, lineage.

Collections:
- ``manifests``: one document per manifest object version seen by the sensor (valid or not,
  with every error listed).
- ``batches``: one document per accepted ``batch_id`` (its ``_id``); inserting it is how a
  batch is claimed, so a batch id can start at most one run.
- ``runs``: one document per Dagster run: status, timings, counts.
- ``lineage``: one document per object published to the lake: inputs with checksums, run,
  recipe, join, row counts.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

DATABASE = "spatial_etl"


class Claim(StrEnum):
    """Outcome of claiming a batch id for a manifest version."""

    CLAIMED = "claimed"  # ours: request the run
    ALREADY_STARTED = "already_started"  # this very manifest version already has a run
    DUPLICATE = "duplicate_batch"  # another manifest holds the batch id


def _now() -> datetime:
    return datetime.now(UTC)


class Ledger:
    """Typed access to the ledger collections."""

    def __init__(self, client: MongoClient, database: str = DATABASE):
        self.db: Database = client[database]

    def record_manifest(
        self, *, manifest_key: str, etag: str, status: str, batch_id: str | None,
        errors: list[str] | None = None, run_key: str | None = None,
    ) -> None:
        """``status``: 'accepted', 'invalid' or 'duplicate_batch'."""
        self.db.manifests.replace_one(
            {"_id": f"{manifest_key}@{etag}"},
            {"manifest_key": manifest_key, "etag": etag, "status": status, "batch_id": batch_id,
             "errors": errors or [], "run_key": run_key, "seen_at": _now()},
            upsert=True,
        )

    def claim_batch(self, *, batch_id: str, manifest_key: str, etag: str,
                    manifest: dict[str, Any]) -> Claim:
        """Claim ``batch_id`` for this manifest version.

        Claiming again with the same manifest version is True while no run has started for
        the batch, so a sensor tick that died after claiming still requests its run on the
        next tick, but no second run is ever requested once one has started.
        """
        try:
            self.db.batches.insert_one({"_id": batch_id, "manifest_key": manifest_key,
                                        "etag": etag, "manifest": manifest,
                                        "claimed_at": _now()})
            return Claim.CLAIMED
        except DuplicateKeyError:
            holder = self.db.batches.find_one({"_id": batch_id}) or {}
            if holder.get("manifest_key") != manifest_key or holder.get("etag") != etag:
                return Claim.DUPLICATE
            return Claim.ALREADY_STARTED if holder.get("run_ids") else Claim.CLAIMED

    def attach_run(self, batch_id: str, run_id: str) -> None:
        """Record that ``run_id`` (a first run or a re-execution) works on ``batch_id``."""
        self.db.batches.update_one({"_id": batch_id}, {"$addToSet": {"run_ids": run_id}})

    def batch(self, batch_id: str) -> dict | None:
        return self.db.batches.find_one({"_id": batch_id})

    def record_run(self, run_id: str, **fields: Any) -> None:
        self.db.runs.update_one(
            {"_id": run_id}, {"$set": {**fields, "updated_at": _now()}}, upsert=True
        )

    def run(self, run_id: str) -> dict | None:
        return self.db.runs.find_one({"_id": run_id})

    def record_lineage(self, lake_uri: str, document: dict[str, Any]) -> None:
        self.db.lineage.replace_one(
            {"_id": lake_uri}, {**document, "recorded_at": _now()}, upsert=True
        )

    def lineage_for_batch(self, batch_id: str) -> list[dict]:
        return list(self.db.lineage.find({"batch_id": batch_id}).sort("_id", 1))

    def manifests_for_key(self, manifest_key: str) -> list[dict]:
        return list(self.db.manifests.find({"manifest_key": manifest_key}))
