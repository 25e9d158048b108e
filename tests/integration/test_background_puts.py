"""BackgroundPuts (libs/object_store.py): the shard stage's chunk writes off the main thread."""

import hashlib
import threading
import uuid

import pytest

from libs import object_store
from libs.object_store import BackgroundPuts

pytestmark = pytest.mark.integration

BUCKET = "etl-staging"


def test_every_object_is_written_before_its_callback_and_wait(store):
    prefix = f"tests/puts-{uuid.uuid4().hex[:8]}/"
    seen: list[tuple[str, bool]] = []
    lock = threading.Lock()
    try:
        with BackgroundPuts(store, threads=2, max_pending=2) as puts:
            for i in range(7):
                key = f"{prefix}object-{i}"

                def then(key: str = key) -> None:
                    with lock:
                        seen.append((key, store.exists(BUCKET, key)))

                puts.put(BUCKET, key, f"payload {i}".encode() * 1000, "text/plain", then=then)
            puts.wait()
            assert sorted(seen) == [(f"{prefix}object-{i}", True) for i in range(7)]
        for i in range(7):
            assert store.get_bytes(BUCKET, f"{prefix}object-{i}") == f"payload {i}".encode() * 1000
    finally:
        store.delete_prefix(BUCKET, prefix)


def test_a_failed_write_is_raised_by_wait_and_names_the_bucket(store):
    missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    with pytest.raises(Exception, match=missing), BackgroundPuts(store) as puts:
        puts.put(missing, "key", b"data", "text/plain")
        puts.wait()


def test_put_bytes_sends_a_chunk_sized_object_in_one_put_and_a_larger_one_in_parts(
        store, monkeypatch):
    """A multipart object's ETag is "<md5 of the parts' md5s>-<parts>"; a single PUT's is
    the object's md5. Chunks (10-30 MiB) go in one PUT; past the limit, in parts."""
    prefix = f"tests/single-put-{uuid.uuid4().hex[:8]}/"
    data = uuid.uuid4().bytes * (12 * 2**20 // 16)  # 12 MiB: the MinIO client's default
    # would split it into 5 MiB parts
    try:
        sha256 = store.put_bytes(BUCKET, f"{prefix}chunk", data, "application/octet-stream")
        assert sha256 == hashlib.sha256(data).hexdigest()
        # write_bytes (staging chunks, which no ledger records) is the same PUT, unhashed
        assert store.write_bytes(BUCKET, f"{prefix}unhashed", data, "application/octet-stream") is None
        etags = {o.key: o.etag for o in store.list(BUCKET, prefix)}
        assert etags[f"{prefix}chunk"] == etags[f"{prefix}unhashed"] == hashlib.md5(data).hexdigest()
        monkeypatch.setattr(object_store, "SINGLE_PUT_BYTES", 5 * 2**20)
        store.put_bytes(BUCKET, f"{prefix}big", data, "application/octet-stream")
        assert {o.key: o.etag for o in store.list(BUCKET, prefix)}[f"{prefix}big"].endswith("-3")
        assert store.get_bytes(BUCKET, f"{prefix}big") == data
    finally:
        store.delete_prefix(BUCKET, prefix)
