"""What the janitor may remove from the staging bucket and the lake, removed in bounded amounts.

Whether a run is finished, and since when, is the orchestrator's to say: callers pass that in.
This module decides from keys, object ages and completion manifests, and never from anything
else: a key it does not recognise is never removed.

Staging: ``runs/<run_id>/`` and ``<op output prefix>/<run_id>/`` belong to one run each.
Lake: a part key ``<dataset>/<batch>/<run_id>.<8 hex>/part-NNNNN.parquet`` that the batch's
current completion manifest does not list, older than the retention, whose run is not live,
is left over by a publisher that died or whose clean-up failed. A publisher writes its parts
and then switches the manifest within one run, so its in-flight parts are younger than the
run; an unreadable manifest keeps every part of its batch (``docs/housekeeping.md``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from datetime import datetime

from libs.lake.keys import run_prefix
from libs.lake.publish import read_completion_manifest
from libs.object_store import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)
RUNS_FOLDER = run_prefix("").rstrip("/")  # "runs"
#: A part of one publication (``libs.lake.keys.publication_prefix`` + ``part_key``).
PART_KEY = re.compile(r"^(?P<dataset>[^/]+)/(?P<batch>[^/]+)/"
                      r"(?P<run_id>[A-Za-z0-9-]+)\.[0-9a-f]{8}/part-\d{5}\.parquet$")


def staged_runs(store: ObjectStore, bucket: str, folders: list[str]) -> dict[str, list[str]]:
    """Run id -> its staging prefixes, for every ``<folder>/<run_id>/`` in ``bucket``."""
    runs: dict[str, list[str]] = {}
    for folder in folders:
        for prefix in store.list_folders(bucket, f"{folder}/"):
            run_id = prefix[len(folder) + 1:].rstrip("/")
            if run_id:
                runs.setdefault(run_id, []).append(prefix)
    return runs


def newest_object(store: ObjectStore, bucket: str, prefixes: list[str]) -> datetime | None:
    """When the newest object under ``prefixes`` was written (None: no object, or no dates)."""
    dates = [o.modified for p in prefixes for o in store.list(bucket, p) if o.modified]
    return max(dates, default=None)


def delete_under(store: ObjectStore, bucket: str, prefixes: list[str], limit: int) -> list[str]:
    """Delete up to ``limit`` objects under ``prefixes``; returns their keys (what is left
    waits for the next call)."""
    for prefix in prefixes:
        if not prefix.endswith("/") or prefix.count("/") < 2:
            raise ValueError(f"refusing to delete under {prefix!r}: not a run's folder")
    keys = [info.key for prefix in prefixes for info in store.list(bucket, prefix)][:limit]
    store.delete_many(bucket, keys)
    return keys


def unlisted_parts(store: ObjectStore, lake_bucket: str, objects: list[ObjectInfo], *,
                   written_before: datetime, run_is_live: Callable[[str], bool]
                   ) -> Iterator[ObjectInfo]:
    """The parts among ``objects`` (a page of the lake's listing) that no completion manifest
    lists, written before ``written_before``, whose publishing run is not live."""
    listed: dict[str, set[str] | None] = {}
    for info in objects:
        match = PART_KEY.match(info.key)
        if match is None or info.modified is None or info.modified >= written_before:
            continue
        batch = match["batch"]
        if batch not in listed:
            listed[batch] = _listed_keys(store, lake_bucket, batch)
        keys = listed[batch]
        if keys is None or info.key in keys or run_is_live(match["run_id"]):
            continue
        yield info


def _listed_keys(store: ObjectStore, lake_bucket: str, batch: str) -> set[str] | None:
    """Every key the batch's completion manifest lists (empty: no manifest); None when it
    cannot be understood, which keeps all of the batch's parts (a store error is raised)."""
    try:
        manifest = store.retried(f"read the completion manifest of batch {batch!r}",
                                 lambda: read_completion_manifest(store, lake_bucket, batch))
        if manifest is None:
            return set()
        return {o["key"] for d in manifest["datasets"].values() for o in d["objects"]}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        log.warning("batch %s: its completion manifest is not readable (%s): its parts are kept",
                    batch, exc)
        return None
