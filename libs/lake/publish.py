"""Publishing to the data lake (layout: ``libs.lake.keys``), completion manifest written last.

A batch is published when, and only when, its completion manifest exists; readers that list
``_batches/`` and read only the objects a manifest names never see a partial batch. Each
publication copies its parts under a folder of its own, so the objects the live manifest lists
are never written over; one PUT of the manifest switches readers from the old set to the new;
the old set is removed only after that switch, and whatever must be true of a published batch
besides its objects (its lineage in the ledger) is recorded before it (``before_switch``). The
PUT is conditional (``If-Match`` the ETag
read at the start, ``If-None-Match: *`` for a first publication): of two runs publishing one
batch at once, one wins and the other fails, removing only its own parts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import UTC, datetime, timedelta

import urllib3
from minio.commonconfig import CopySource
from minio.error import S3Error, ServerError

from libs.descriptors import StagedPart
from libs.errors import PublishConflictError, PublishError
from libs.lake.keys import completion_key, part_key, publication_id, publication_prefix
from libs.object_store import ObjectStore

log = logging.getLogger(__name__)
_MISSING = ("NoSuchKey", "NoSuchObject", "ResourceNotFound")


def read_completion_manifest(store: ObjectStore, lake_bucket: str, batch_id: str) -> dict | None:
    """The batch's completion manifest, or None when the batch is not published."""
    return read_completion_manifest_and_etag(store, lake_bucket, batch_id)[0]


def read_completion_manifest_and_etag(store: ObjectStore, lake_bucket: str,
                                      batch_id: str) -> tuple[dict | None, str | None]:
    """The completion manifest and the ETag of the version read (both None when absent), read
    in one GET so that the ETag is that of the document returned."""
    try:
        response = store.client.get_object(lake_bucket, completion_key(batch_id))
    except S3Error as exc:
        if exc.code in _MISSING:
            return None, None
        raise
    try:
        return json.loads(response.read()), response.headers.get("ETag", "").strip('"')
    finally:
        response.close()
        response.release_conn()


def put_completion_manifest(store: ObjectStore, lake_bucket: str, batch_id: str, body: bytes,
                            replaces_etag: str | None) -> None:
    """Write the completion manifest only if it is still the version whose ETag is
    ``replaces_etag`` (None: only if there is none). PublishConflictError otherwise.

    The MinIO client sends no conditional headers on a PUT, so this PUT goes to a presigned
    URL (its signature covers the host only) with ``If-Match``/``If-None-Match`` added. MinIO
    (since 2024-08) and SeaweedFS (4.48, tried) answer 412 when the condition fails.
    """
    key = completion_key(batch_id)
    url = store.client.presigned_put_object(lake_bucket, key, expires=timedelta(minutes=10))
    condition = {"If-None-Match": "*"} if replaces_etag is None else {
        "If-Match": f'"{replaces_etag}"'}
    response = urllib3.request(
        "PUT", url, body=body, headers={"Content-Type": "application/json", **condition},
        timeout=urllib3.Timeout(connect=5.0, read=60.0), retries=False)
    # 409: S3 answers so when another conditional write of the key is in flight; 404 to an
    # If-Match: the manifest was removed meanwhile
    if response.status in (409, 412) or (response.status == 404 and replaces_etag is not None):
        raise PublishConflictError(
            f"batch {batch_id!r}: another run published s3://{lake_bucket}/{key} meanwhile "
            f"(expected {'no manifest' if replaces_etag is None else 'ETag ' + replaces_etag}; "
            f"the server answered {response.status}); re-execute the run to publish it again")
    if response.status >= 500:
        raise ServerError(f"PUT s3://{lake_bucket}/{key}: {response.status} "
                          f"{response.data[:200]!r}", response.status)
    if response.status >= 300:
        raise PublishError(f"batch {batch_id!r}: writing s3://{lake_bucket}/{key} was refused "
                           f"({response.status}: {response.data[:300]!r}); check the pipeline "
                           "identity's write access to the lake bucket")


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
    before_switch: Callable[[dict], None] | None = None,
) -> dict:
    """Copy staged parts into this publication's lake keys, switch the completion manifest to
    them (conditionally: see the module), then remove the objects the previous manifest listed;
    returns the manifest.

    The copies are server-side (no byte passes through this process) and ``copy_threads`` run
    at once: each waits on the store far more than it works here.

    ``before_switch(manifest)`` runs once every part is in place and before the switch: what
    it records (the lineage) exists before readers can see the batch. If it raises, nothing is
    switched and the error is handled as below.

    Every object-store call is retried by the store's policy (``libs.retry``). If the
    store stays unavailable, or another run switched the manifest first
    (PublishConflictError), the objects this call wrote are removed where possible (only ever
    its own), the manifest is left as it was, and PublishError is raised: nothing new is
    published, and re-executing the run retries.
    """

    def retried(what: str, call):
        return store.retried(what, call)

    publication = publication_id(run_id)
    previous: dict | None = None
    written: list[str] = []
    manifest_datasets: dict[str, dict] = {}
    try:
        previous, etag = retried(
            "read the completion manifest",
            lambda: read_completion_manifest_and_etag(store, lake_bucket, batch_id))
        copies: list[tuple[str, StagedPart]] = []
        for dataset, parts in datasets.items():
            prefix = publication_prefix(dataset, batch_id, publication)
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
            "publication": publication,
            "published_at": datetime.now(UTC).isoformat(),
            "datasets": manifest_datasets,
        }
        if before_switch is not None:
            before_switch(manifest)
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
        _switch(store, lake_bucket, batch_id, body, etag, publication, retried)
    except Exception as exc:
        for key in written:
            try:
                store.delete(lake_bucket, key)
            except Exception:  # noqa: BLE001 - best effort; the original error matters
                pass
        if isinstance(exc, PublishConflictError):
            raise
        raise PublishError(
            f"batch {batch_id!r}: publishing to bucket {lake_bucket!r} failed ({exc}); "
            "nothing new was published, re-execute the run to retry"
        ) from exc
    # Published. Only now do the previous publication's objects go: a reader holding the old
    # manifest keeps finding its objects until the new one exists. Only what the previous
    # manifest lists is removed, never "whatever else is in the folder": that may be the
    # in-flight parts of a concurrent publisher, whose own switch would then list missing
    # objects. A failure here leaves unlisted objects (invisible to readers), so it is logged.
    keep = {o["key"] for d in manifest_datasets.values() for o in d["objects"]}
    for stale in sorted({o["key"] for d in (previous or {}).get("datasets", {}).values()
                         for o in d["objects"]} - keep):
        try:
            retried(f"delete {stale}", lambda k=stale: store.delete(lake_bucket, k))
        except Exception as exc:  # noqa: BLE001 - the batch is published; see above
            log.warning("batch %s: could not remove s3://%s/%s of the previous publication "
                        "(%s); no completion manifest lists it any more", batch_id,
                        lake_bucket, stale, exc)
    return manifest


def _switch(store: ObjectStore, lake_bucket: str, batch_id: str, body: bytes,
            etag: str | None, publication: str, retried) -> None:
    """The conditional PUT of the manifest. A retried PUT whose first try succeeded but whose
    answer was lost fails its condition; reading the manifest back tells that case (it is
    already ours) from a real conflict."""
    try:
        retried("write the completion manifest",
                lambda: put_completion_manifest(store, lake_bucket, batch_id, body, etag))
    except PublishConflictError:
        current, _ = retried("read the completion manifest back", lambda: (
            read_completion_manifest_and_etag(store, lake_bucket, batch_id)))
        if (current or {}).get("publication") != publication:
            raise


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
