"""Publishing to the data lake (layout: ``libs.lake.keys``), completion manifest written last.

A batch is published when, and only when, its completion manifest exists; readers that
list ``_batches/`` and read only the objects a manifest names never see a partial batch.
Re-publishing a batch writes the same keys again and removes keys it no longer has.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import UTC, datetime

from minio.commonconfig import CopySource

from libs.descriptors import StagedPart
from libs.errors import PublishError
from libs.lake.keys import completion_key, dataset_prefix, part_key
from libs.object_store import ObjectStore


def read_completion_manifest(store: ObjectStore, lake_bucket: str, batch_id: str) -> dict | None:
    key = completion_key(batch_id)
    if not store.exists(lake_bucket, key):
        return None
    return json.loads(store.get_bytes(lake_bucket, key))


def publish_to_lake(
    store: ObjectStore,
    *,
    staging_bucket: str,
    lake_bucket: str,
    batch_id: str,
    run_id: str,
    datasets: dict[str, list[StagedPart]],
    dataset_info: dict[str, dict],
    copy_threads: int = 4,
) -> dict:
    """Copy staged parts into the lake, write the completion manifest last, then remove keys
    the batch no longer has; returns the manifest.

    The copies are server-side (no byte passes through this process) and ``copy_threads`` run
    at once: each waits on the store far more than it works here.

    Every object-store call is retried by the store's policy (``libs.retry``). If the
    store stays unavailable, the objects this call wrote are removed where possible (never
    ones an earlier publication of the batch lists), no completion manifest is written, and
    PublishError is raised: nothing new is published, and re-executing the run retries.
    """

    def retried(what: str, call):
        return store.retried(what, call)

    previous: dict | None = None
    previously_listed: set[str] = set()
    written: list[str] = []
    manifest_datasets: dict[str, dict] = {}
    try:
        previous = retried("read the completion manifest",
                           lambda: read_completion_manifest(store, lake_bucket, batch_id))
        previously_listed = {
            o["key"] for d in (previous or {}).get("datasets", {}).values() for o in d["objects"]
        }
        copies: list[tuple[str, StagedPart]] = []
        for dataset, parts in datasets.items():
            prefix = dataset_prefix(dataset, batch_id)
            objects = []
            for number, part in enumerate(parts):
                key = part_key(prefix, number)
                copies.append((key, part))
                objects.append({"key": key, "rows": part.rows, "bytes": part.bytes,
                                "sha256": part.sha256})
            manifest_datasets[dataset] = {
                **dataset_info.get(dataset, {}),
                "prefix": prefix,
                "rows": sum(o["rows"] for o in objects),
                "objects": objects,
            }
        _copy_all(store, staging_bucket, lake_bucket, copies, retried, copy_threads, written)
        manifest = {
            "batch_id": batch_id,
            "run_id": run_id,
            "published_at": datetime.now(UTC).isoformat(),
            "datasets": manifest_datasets,
        }
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
        retried("write the completion manifest", lambda: store.put_bytes(
            lake_bucket, completion_key(batch_id), body, "application/json"))
    except Exception as exc:
        for key in written:
            if key not in previously_listed:
                try:
                    store.delete(lake_bucket, key)
                except Exception:  # noqa: BLE001 - best effort; the original error matters
                    pass
        raise PublishError(
            f"batch {batch_id!r}: publishing to bucket {lake_bucket!r} failed ({exc}); "
            "nothing new was published, re-execute the run to retry"
        ) from exc
    # Published. Keys of an earlier publication that this one no longer has go last, so a
    # reader of the previous manifest never loses an object before the new one exists.
    keep = set(written)
    stale_prefixes = {dataset_prefix(d, batch_id) for d in datasets} | {
        d["prefix"] for d in (previous or {}).get("datasets", {}).values()}
    for prefix in sorted(stale_prefixes):
        for stale in retried(f"list {prefix}", lambda p=prefix: list(store.list(lake_bucket, p))):
            if stale.key not in keep:
                retried(f"delete {stale.key}", lambda k=stale.key: store.delete(lake_bucket, k))
    return manifest


def _copy_all(store: ObjectStore, staging_bucket: str, lake_bucket: str,
              copies: list[tuple[str, StagedPart]], retried, threads: int,
              written: list[str]) -> None:
    """Server-side copy of each staged part to its lake key, ``threads`` at a time. Every key
    copied is appended to ``written``; the first copy that fails (after its retries) cancels
    the copies not yet started, and its error is raised once the running ones end."""

    def copy(key: str, part: StagedPart) -> None:
        source = CopySource(staging_bucket, part.staging_key)
        retried(f"copy {part.staging_key} to {key}",
                lambda: store.client.copy_object(lake_bucket, key, source))

    error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="lake-copy") as pool:
        futures = {pool.submit(copy, key, part): key for key, part in copies}
        for future in as_completed(futures):
            if future.cancelled():
                continue
            if future.exception() is None:
                written.append(futures[future])
            elif error is None:
                error = future.exception()
                for other in futures:
                    other.cancel()
    if error is not None:
        raise error
