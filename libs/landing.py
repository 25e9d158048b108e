"""Client side of the landing zone: upload a batch folder so the sensor never sees half of it.

Data files go first and the manifest last: the sensor reacts to the manifest only.
"""

from __future__ import annotations

from pathlib import Path

from libs.manifest import MANIFEST_FILENAME
from libs.object_store import ObjectStore

LANDING_BUCKET = "landing-zone"


def land_batch(store: ObjectStore, folder: Path, prefix: str,
               bucket: str = LANDING_BUCKET) -> list[str]:
    """Upload every file under ``folder`` to ``bucket/prefix/``, the manifest last; returns keys."""
    manifest = folder / MANIFEST_FILENAME
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} does not exist; a batch folder needs a manifest")
    prefix = prefix.strip("/")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p != manifest)
    keys = []
    for path in [*files, manifest]:
        key = f"{prefix}/{path.relative_to(folder).as_posix()}"
        store.upload(bucket, key, path, "application/octet-stream")
        keys.append(key)
    return keys
