"""Publishing to the data lake: stable layout, completion manifest written last.

Layout (bucket ``data-lake``)::

    <dataset>/<batch_id>/part-<NNNNN>.parquet     GeoParquet 1.1, one dataset per layer/join
    _batches/<batch_id>.json                      completion manifest, written last

A batch is published when, and only when, its completion manifest exists; readers that
list ``_batches/`` and read only the objects a manifest names never see a partial batch.
Re-publishing a batch writes the same keys again and removes keys it no longer has.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from datetime import UTC, datetime

from minio.commonconfig import CopySource

from libs.errors import PublishError
from libs.object_store import ObjectStore

COMPLETION_PREFIX = "_batches/"


@dataclass(frozen=True)
class StagedPart:
    """One staged GeoParquet object destined for the lake."""

    staging_key: str
    rows: int
    bytes: int
    sha256: str


def dataset_prefix(dataset: str, batch_id: str) -> str:
    return f"{dataset}/{batch_id}/"


def completion_key(batch_id: str) -> str:
    return f"{COMPLETION_PREFIX}{batch_id}.json"


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
) -> dict:
    """Copy staged parts into the lake, then write the completion manifest; returns it.

    On failure before the manifest is written, the objects this call wrote are removed
    (unless an earlier publication of the batch already listed them) and PublishError raised.
    """
    previous = read_completion_manifest(store, lake_bucket, batch_id)
    previously_listed = {
        o["key"] for d in (previous or {}).get("datasets", {}).values() for o in d["objects"]
    }
    written: list[str] = []
    manifest_datasets: dict[str, dict] = {}
    try:
        for dataset, parts in datasets.items():
            prefix = dataset_prefix(dataset, batch_id)
            objects = []
            for number, part in enumerate(parts):
                key = posixpath.join(prefix, f"part-{number:05d}.parquet")
                store.client.copy_object(lake_bucket, key, CopySource(staging_bucket, part.staging_key))
                written.append(key)
                objects.append({"key": key, "rows": part.rows, "bytes": part.bytes,
                                "sha256": part.sha256})
            keep = {o["key"] for o in objects}
            for stale in store.list(lake_bucket, prefix):
                if stale.key not in keep:
                    store.delete(lake_bucket, stale.key)
            manifest_datasets[dataset] = {
                **dataset_info.get(dataset, {}),
                "prefix": prefix,
                "rows": sum(o["rows"] for o in objects),
                "objects": objects,
            }
        manifest = {
            "batch_id": batch_id,
            "run_id": run_id,
            "published_at": datetime.now(UTC).isoformat(),
            "datasets": manifest_datasets,
        }
        store.put_bytes(lake_bucket, completion_key(batch_id),
                        json.dumps(manifest, indent=2, sort_keys=True).encode(),
                        "application/json")
    except Exception as exc:
        for key in written:
            if key not in previously_listed:
                try:
                    store.delete(lake_bucket, key)
                except Exception:  # noqa: BLE001 - best effort; the original error matters
                    pass
        if isinstance(exc, PublishError):
            raise
        raise PublishError(
            f"batch {batch_id!r}: publishing to bucket {lake_bucket!r} failed ({exc}); "
            "nothing new was published, re-execute the run to retry"
        ) from exc
    return manifest
