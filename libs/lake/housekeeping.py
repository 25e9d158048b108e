"""What the janitor may remove from the staging bucket and the lake, and why it may.

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


def staged_objects(store: ObjectStore, bucket: str,
                   folders: list[str]) -> dict[str, list[ObjectInfo]]:
    """Run id -> its objects, for every object under ``<folder>/<run_id>/`` in ``bucket``: one
    listing of each folder (pages of 1,000 keys), not one per run."""
    runs: dict[str, list[ObjectInfo]] = {}
    for folder in folders:
        for info in store.list(bucket, f"{folder}/"):
            run_id, _, rest = info.key[len(folder) + 1:].partition("/")
            if run_id and rest:
                runs.setdefault(run_id, []).append(info)
    return runs


def folders_of(keys: list[str], depth: int = 2) -> list[str]:
    """Every folder holding ``keys`` below the first ``depth`` levels (``runs/<run_id>/`` and
    below), deepest first. SeaweedFS keeps a folder once emptied; deleting these keys after
    their objects removes it (on S3 proper they do not exist and the delete is a no-op; a
    folder that is not empty stays either way)."""
    folders = set()
    for key in keys:
        parts = key.split("/")[:-1]
        folders.update("/".join(parts[:n]) + "/" for n in range(depth, len(parts) + 1))
    return sorted(folders, key=lambda folder: (-folder.count("/"), folder))


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
