"""BackgroundPuts (libs/object_store.py): the shard op's chunk writes off the main thread."""

import threading
import uuid

import pytest

from libs.object_store import BackgroundPuts

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
