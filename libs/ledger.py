"""The ledger (MongoDB database ``spatial_etl``): manifests seen, batches claimed, runs, lineage.

Collections:
- ``manifests``: one document per manifest object version seen by the sensor (valid or not,
  with every error listed).
- ``batches``: one document per accepted ``batch_id`` (its ``_id``); inserting it is how a
  batch is claimed, so a batch id can start at most one run. The claim names its claimant
  (Dagster instance and sensor tick); its single-use token goes with the sensor's run
  request; ``start_run`` spends it (see there). ``pinned``: the manifest's and every landed
  object's ETag and size, as validated; every later read of the batch reads exactly those.
- ``runs``: one document per Dagster run: status, timings, counts.
- ``lineage``: one document per object published to the lake: inputs with checksums, run,
  publication, recipe, join, row counts. It is written before the completion manifest
  switches to the publication, so a publication that never went live (its switch failed, or
  another run's won) may have lineage: readers ask for the publication the completion
  manifest names (``lineage_for_batch(batch_id, publication)``).

Every method is one call under the ledger's ``RetryPolicy`` (``libs.retry``): each is safe to
repeat after a reconnect (an insert whose acknowledgement was lost finds its own document).
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

from pymongo import MongoClient, ReplaceOne
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from libs.retry import RetryPolicy

DATABASE = "spatial_etl"
#: Run tag of the manifest sensor's run requests: the single-use token of the batch's claim.
CLAIM_TOKEN_TAG = "spatial-etl/claim-token"
#: Run tag that lets a hand-launched run process a batch id that already has a claim or run;
#: its value is the reason, logged by the run and recorded in ``batches.overrides``.
OVERRIDE_CLAIM_TAG = "spatial-etl/override-claim"


#: A claim older than this, of another Dagster instance, with no run started for it, is taken
#: over (its claimant is presumed gone: a run queued there that starts later finds its claim
#: token replaced and fails in validate_batch, naming the new claimant).
CLAIM_EXPIRES_SECONDS = 3600


@dataclass(frozen=True)
class Claimant:
    """Who claims a batch: a Dagster instance's stable id and the sensor tick that claimed."""

    instance: str
    tick: str


class Claim(StrEnum):
    """Outcome of claiming a batch id for a manifest version."""

    CLAIMED = "claimed"  # ours: request the run
    ALREADY_STARTED = "already_started"  # this very manifest version already has a run
    DUPLICATE = "duplicate_batch"  # another manifest, or another instance, holds the batch id
    REFUSED = "refused"  # this manifest's key holds the batch id, but its run already started


class RunStart(StrEnum):
    """Why ``start_run`` let a run work on a batch."""

    SENSOR = "sensor"  # the run the manifest sensor requested: it spent the claim's token
    REEXECUTION = "reexecution"  # a Dagster re-execution of one of the batch's runs
    FIRST = "first"  # no claim or run existed for the batch: this run claimed it
    OVERRIDE = "override"  # the batch already had a claim or run; an override tag said go


class BatchAlreadyClaimed(RuntimeError):
    """A run that neither the sensor requested nor re-executes the batch's run, for a batch
    id the ledger already holds a claim or a run for, and without an override."""


class ClaimedVersionChanged(BatchAlreadyClaimed):
    """The run's manifest is not the version its claim was made for (replaced since)."""


def _now() -> datetime:
    return datetime.now(UTC)


F = TypeVar("F", bound=Callable[..., Any])


def _retried(method: F) -> F:
    """Run ``method`` under the ledger's retry policy (MongoDB reconnects, elections)."""

    @functools.wraps(method)
    def call(self: Ledger, *args: Any, **kwargs: Any) -> Any:
        return self.policy.call(lambda: method(self, *args, **kwargs),
                                what=f"call the ledger's {method.__name__} (MongoDB database "
                                     f"{self.db.name})")

    return call  # type: ignore[return-value]


class Ledger:
    """Typed access to the ledger collections."""

    def __init__(self, client: MongoClient, database: str = DATABASE,
                 policy: RetryPolicy | None = None):
        self.db: Database = client[database]
        self.policy = policy or RetryPolicy()
        self._pending_indexed = False

    @_retried
    def record_manifest(
        self, *, manifest_key: str, etag: str, status: str, batch_id: str | None,
        errors: list[str] | None = None, run_key: str | None = None,
    ) -> None:
        """``status``: 'accepted', 'invalid', 'duplicate_batch', 'refused' or 'unreadable'
        (a failed read, tried again by the next tick)."""
        self.db.manifests.replace_one(
            {"_id": f"{manifest_key}@{etag}"},
            {"manifest_key": manifest_key, "etag": etag, "status": status, "batch_id": batch_id,
             "errors": errors or [], "run_key": run_key, "seen_at": _now()},
            upsert=True,
        )

    @_retried
    def claim_batch(self, *, batch_id: str, manifest_key: str, etag: str,
                    manifest: dict[str, Any], claimant: Claimant,
                    expires_seconds: float = CLAIM_EXPIRES_SECONDS) -> Claim:
        """Claim ``batch_id`` for this manifest version, for ``claimant``.

        Claiming again with the same manifest version is CLAIMED for the same Dagster instance
        while no run has started for the batch, so a sensor tick that died after claiming
        still requests its run on the next tick (``run_key`` dedups it in Dagster), but no
        second run is ever requested once one has started. Another instance's claim makes
        this one a DUPLICATE, until it is ``expires_seconds`` old with no run started: then it
        is taken over, with a new token. A new version of the claiming manifest (same key,
        replaced before its run started) takes the claim over, so the batch runs on what is
        landed now; once a run started it is REFUSED.
        """
        ours = asdict(claimant)
        try:
            self.db.batches.insert_one({"_id": batch_id, "manifest_key": manifest_key,
                                        "etag": etag, "manifest": manifest, "claimed_by": ours,
                                        "pending": claimant.instance, "claimed_at": _now(),
                                        "claim_token": secrets.token_hex(16)})
            return Claim.CLAIMED
        except DuplicateKeyError:
            holder = self.db.batches.find_one({"_id": batch_id}) or {}
        if holder.get("manifest_key") != manifest_key:
            return Claim.DUPLICATE
        started = bool(holder.get("run_ids")) or "claim_spent_by" in holder
        if started:
            return Claim.ALREADY_STARTED if holder.get("etag") == etag else Claim.REFUSED
        unstarted = {"_id": batch_id, "run_ids": {"$exists": False},
                     "claim_spent_by": {"$exists": False}}
        # a claim made before claimants were recorded is the first instance's to take
        held_by = (holder.get("claimed_by") or {}).get("instance", claimant.instance)
        if held_by != claimant.instance:
            expired = self.db.batches.update_one(
                {**unstarted, "claimed_by": holder.get("claimed_by"),
                 "claimed_at": {"$lt": _now() - timedelta(seconds=expires_seconds)}},
                {"$set": {"etag": etag, "manifest": manifest, "claimed_by": ours,
                          "pending": claimant.instance, "claimed_at": _now(),
                          "claim_token": secrets.token_hex(16)},
                 "$push": {"taken_over": {"from": holder.get("claimed_by"), "at": _now()}}})
            return Claim.CLAIMED if expired.modified_count == 1 else Claim.DUPLICATE
        if holder.get("etag") == etag:
            return Claim.CLAIMED
        # conditional on no run having started: a run spending the token meanwhile wins
        moved = self.db.batches.update_one(
            {**unstarted, "etag": holder.get("etag")},
            {"$set": {"etag": etag, "manifest": manifest, "claimed_by": ours,
                      "reclaimed_at": _now()}})
        return Claim.CLAIMED if moved.modified_count == 1 else Claim.REFUSED

    @_retried
    def record_duplicate_claim(self, batch_id: str, claimant: Claimant) -> None:
        """Note another instance's attempt to claim the batch (the last 20 are kept)."""
        self.db.batches.update_one({"_id": batch_id}, {"$push": {"duplicate_claims": {
            "$each": [{**asdict(claimant), "at": _now()}], "$slice": -20}}})

    @_retried
    def unstarted_claims(self, instance: str, older_than_seconds: float,
                         limit: int = 50) -> list[dict]:
        """``instance``'s claims at least ``older_than_seconds`` old whose run has not started
        (oldest first): the sensor re-requests those without a run in its run storage.
        ``pending`` (the claimant's id, unset when the claim is spent) keeps this an index
        lookup of the few unstarted claims, not a scan of every batch ever claimed."""
        if not self._pending_indexed:
            self.db.batches.create_index("pending", sparse=True)
            self._pending_indexed = True
        return list(self.db.batches.find(
            {"pending": instance, "run_ids": {"$exists": False},
             "claim_spent_by": {"$exists": False},
             "claimed_at": {"$lt": _now() - timedelta(seconds=older_than_seconds)}},
            {"manifest_key": 1, "etag": 1, "claim_token": 1, "claimed_by": 1},
        ).sort("claimed_at", 1).limit(limit))

    @_retried
    def pin_versions(self, batch_id: str, run_id: str, pinned: dict[str, Any]) -> dict[str, Any]:
        """Record the versions ``run_id`` validated (``{"manifest": {...}, "objects": [...]}``,
        each with key, etag and size), unless the batch has pins already: returns the pins
        the batch reads from now on (an earlier run's, if any)."""
        self.db.batches.update_one({"_id": batch_id, "pinned": {"$exists": False}},
                                   {"$set": {"pinned": {**pinned, "by_run": run_id,
                                                        "at": _now()}}})
        # data files released after a run failed on them (``release_pins``): pinned anew
        self.db.batches.update_one(
            {"_id": batch_id, "pinned": {"$exists": True}, "pinned.objects": {"$exists": False}},
            {"$set": {"pinned.objects": pinned.get("objects", []), "pinned.by_run": run_id,
                      "pinned.at": _now()}})
        return (self.db.batches.find_one({"_id": batch_id}, {"pinned": 1}) or {}).get("pinned", {})

    @_retried
    def repin_versions(self, batch_id: str, run_id: str, pinned: dict[str, Any]) -> None:
        """Replace the batch's pins (a run that processes the batch again on purpose)."""
        self.db.batches.update_one({"_id": batch_id}, {"$set": {"pinned": {
            **pinned, "by_run": run_id, "at": _now()}}})

    @_retried
    def release_pins(self, batch_id: str, run_id: str, reason: str) -> None:
        """Forget the pins of the batch's data files after ``run_id`` failed on its input
        data with nothing published: the next validate of the batch (a re-execution of all
        steps) pins the files as they are then. The manifest stays pinned (the batch is the
        manifest version it claimed). The release is kept in ``pins_released``."""
        self.db.batches.update_one({"_id": batch_id}, {
            "$unset": {"pinned.objects": ""},
            "$push": {"pins_released": {"run_id": run_id, "reason": reason[:2000],
                                        "at": _now()}}})

    @_retried
    def claim_token(self, batch_id: str) -> str:
        """The single-use token of ``batch_id``'s claim, for the run request that claim allows
        (a claim recorded before tokens existed gets one now)."""
        self.db.batches.update_one({"_id": batch_id, "claim_token": {"$exists": False}},
                                   {"$set": {"claim_token": secrets.token_hex(16)}})
        return self.db.batches.find_one({"_id": batch_id}, {"claim_token": 1})["claim_token"]

    @_retried
    def start_run(self, *, batch_id: str, run_id: str, manifest_key: str, etag: str,
                  claim_token: str | None, reexecution_of: str | None,
                  override: str | None) -> RunStart:
        """Let ``run_id`` work on ``batch_id``, or raise ``BatchAlreadyClaimed``.

        In order: the run carrying the claim's token spends it (once: a copy of the token in
        a hand-made run finds it spent); a re-execution whose root run is one of the batch's
        runs continues it; a run for a batch id the ledger has never seen claims it; anything
        else needs ``override`` (a reason), which is recorded with the batch.
        """
        batches = self.db.batches
        if reexecution_of is not None:
            if batches.find_one_and_update({"_id": batch_id, "run_ids": reexecution_of},
                                           {"$addToSet": {"run_ids": run_id}}):
                return RunStart.REEXECUTION
        if claim_token is not None:
            spent = batches.find_one_and_update(
                {"_id": batch_id, "claim_token": claim_token, "etag": etag,
                 "$or": [{"claim_spent_by": {"$exists": False}}, {"claim_spent_by": run_id}]},
                {"$set": {"claim_spent_by": run_id}, "$addToSet": {"run_ids": run_id},
                 "$unset": {"pending": ""}})
            if spent:
                return RunStart.SENSOR
            claim = batches.find_one({"_id": batch_id, "claim_token": claim_token,
                                      "claim_spent_by": {"$exists": False}}) or {}
            if claim and claim.get("etag") != etag:
                raise ClaimedVersionChanged(
                    f"batch {batch_id!r}: manifest {manifest_key!r} was replaced after the "
                    f"manifest sensor claimed it (claimed ETag {claim.get('etag')!r}, now "
                    f"{etag!r}); the run reads only the version it claimed. The sensor takes "
                    "the claim over for the new version within a tick or two; then re-execute "
                    "this run, or land the data under a new batch_id")
        try:
            batches.insert_one({"_id": batch_id, "manifest_key": manifest_key, "etag": etag,
                                "claimed_at": _now(), "claimed_by": {"run": run_id}, "run_ids": [run_id],
                                "claim_spent_by": run_id})
            return RunStart.FIRST
        except DuplicateKeyError:
            holder = batches.find_one({"_id": batch_id}) or {}
        if run_id in holder.get("run_ids", []):  # this run's own validate step, retried
            return RunStart.OVERRIDE if override else RunStart.FIRST
        if not override and claim_token is not None and holder.get("taken_over"):
            raise BatchAlreadyClaimed(
                f"batch {batch_id!r}: this run's claim expired unstarted and was taken over by "
                f"{holder.get('claimed_by')} (the batch's taken_over record), which runs the "
                "batch; nothing to do here, or land the data under a new batch_id")
        if not override:
            raise BatchAlreadyClaimed(
                f"batch {batch_id!r} already has run(s) {holder.get('run_ids', [])} or a claim "
                f"by manifest {holder.get('manifest_key')!r}, and run {run_id} was neither "
                "requested by the manifest sensor nor is a re-execution of the batch's run; "
                "re-execute that run in Dagster, land the data under a new batch_id, or, to "
                f"process the batch again on purpose, add the run tag {OVERRIDE_CLAIM_TAG!r} "
                "with the reason as its value")
        batches.update_one({"_id": batch_id}, {
            "$addToSet": {"run_ids": run_id},
            "$push": {"overrides": {"run_id": run_id, "reason": override, "at": _now()}},
            "$unset": {"pending": ""}})
        return RunStart.OVERRIDE

    @_retried
    def attach_run(self, batch_id: str, run_id: str) -> None:
        """Record that ``run_id`` (a first run or a re-execution) works on ``batch_id``."""
        self.db.batches.update_one({"_id": batch_id}, {"$addToSet": {"run_ids": run_id}})

    @_retried
    def batch(self, batch_id: str) -> dict | None:
        return self.db.batches.find_one({"_id": batch_id})

    @_retried
    def record_run(self, run_id: str, **fields: Any) -> None:
        self.db.runs.update_one(
            {"_id": run_id}, {"$set": {**fields, "updated_at": _now()}}, upsert=True
        )

    @_retried
    def run(self, run_id: str) -> dict | None:
        return self.db.runs.find_one({"_id": run_id})

    @_retried
    def record_lineage(self, lake_uri: str, document: dict[str, Any]) -> None:
        self.db.lineage.replace_one(
            {"_id": lake_uri}, {**document, "recorded_at": _now()}, upsert=True
        )

    @_retried
    def record_lineages(self, records: list[tuple[str, dict[str, Any]]]) -> None:
        """``record_lineage`` of every (lake URI, document) in one round trip (a batch can
        have thousands of parts); repeating it after a lost acknowledgement is harmless."""
        if records:
            now = _now()
            self.db.lineage.bulk_write([ReplaceOne({"_id": uri}, {**doc, "recorded_at": now},
                                                   upsert=True) for uri, doc in records],
                                       ordered=False)

    @_retried
    def forget_lineage(self, publication: str) -> int:
        """Remove the lineage of a publication that never went live; how many documents."""
        return self.db.lineage.delete_many({"publication": publication}).deleted_count

    @_retried
    def lineage_for_batch(self, batch_id: str, publication: str | None = None) -> list[dict]:
        """The lineage of the batch's objects: of ``publication`` only (the one the batch's
        completion manifest names: what readers see), or of every publication ever tried."""
        query = {"batch_id": batch_id}
        if publication is not None:
            query["publication"] = publication
        return list(self.db.lineage.find(query).sort("_id", 1))

    @_retried
    def settled_manifests(self, versions: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (manifest key, etag) versions the sensor need never look at again:
        recorded as refused, or accepted with a run started for the batch (an accepted one
        whose run has not started may still need its run request)."""
        settled: set[tuple[str, str]] = set()
        waiting: dict[str, list[tuple[str, str]]] = {}
        for start in range(0, len(versions), 500):
            ids = [f"{key}@{etag}" for key, etag in versions[start:start + 500]]
            for doc in self.db.manifests.find({"_id": {"$in": ids}},
                                              {"manifest_key": 1, "etag": 1, "status": 1,
                                               "batch_id": 1}):
                version = (doc["manifest_key"], doc["etag"])
                if doc.get("status") == "accepted":
                    waiting.setdefault(doc.get("batch_id"), []).append(version)
                elif doc.get("status") != "unreadable":  # a failed read is tried again
                    settled.add(version)
        names = list(waiting)
        for start in range(0, len(names), 500):
            for doc in self.db.batches.find({"_id": {"$in": names[start:start + 500]}},
                                            {"run_ids": 1}):
                if doc.get("run_ids"):
                    settled.update(waiting[doc["_id"]])
        return settled

    @_retried
    def manifests_for_key(self, manifest_key: str) -> list[dict]:
        return list(self.db.manifests.find({"manifest_key": manifest_key}))


#: The ledger's cause of a run that run monitoring failed because its process was gone (lost
#: with its container, or killed): Dagster could not reach it to stop it.
PROCESS_LOST_CAUSE = "the run's process stopped responding (run monitoring)"

# Run monitoring's failure messages (Dagster 1.13 `_daemon/monitoring/run_monitoring.py`),
# most specific first: the ledger maps them to a cause a data team can act on.
_MONITOR_CAUSES = (
    ("Exceeded maximum runtime of", "the run exceeded its maximum runtime (tag dagster/max_runtime) "
     "and was stopped (run monitoring); re-execute it, with a larger tag if it needs longer"),
    ("being forcibly marked as failed", PROCESS_LOST_CAUSE),
    ("Detected run worker status", PROCESS_LOST_CAUSE),
    ("taking longer than", "the run's process never started (run monitoring)"),
)


def run_failure_cause(message: str | None) -> str | None:
    """The user-facing cause of a run failed by Dagster's run monitoring, from its failure
    message; None for any other failure (a step's or the run's own error says it all)."""
    for marker, cause in _MONITOR_CAUSES:
        if marker in (message or ""):
            return cause
    return None


def reexecution_hint(run_url: str, *, all_steps: bool) -> str:
    """How to retry a run that failed on landed data: land the fix at the same keys, then
    re-execute the run (``run_url``) from the Dagster UI; nothing of the batch was published.
    ``all_steps``: the validate step must run again (it pins the versions the run reads)."""
    how = ("Re-execute > All steps (not 'From failure': validate must run again to pin the "
           "corrected files)") if all_steps else "Re-execute (from failure or all steps)"
    return (f"Nothing of the batch was published. To retry: land the corrected file(s) at the "
            f"same key(s) in the batch's folder, then open the run in the Dagster UI "
            f"({run_url}) and choose {how}; the re-execution reads the files as they are then.")


def step_failure_cause(step: str | None, message: str | None) -> dict[str, str]:
    """The ledger's fields for a run that failed in ``step`` with ``message`` (the error the
    step raised, as the user reads it): ``failed_step`` and ``cause``."""
    fields = {"failed_step": step} if step else {}
    if message:
        # "libs.errors.InputDataError: ..." -> "InputDataError: ...": the class says what kind
        fields["cause"] = re.sub(r"^(?:[a-z_][\w]*\.)+(?=[A-Z]\w*: )", "", message.strip())
    return fields
