"""S3-compatible object storage (MinIO in compose, SeaweedFS locally) behind one small API.

Reads can be pinned to the version a batch validated (``ObjectInfo`` from ``stat``): the GET
carries ``If-Match`` and the answer's ETag and size are compared too (a store that ignores
the header is still caught), else ``PinnedVersionChanged`` names the object, both versions.

Settings travel as a plain picklable dataclass so that Ray workers, which run on other
machines in a real cluster, can open their own client from the same description. Every call
goes through the settings' ``RetryPolicy`` (``libs.retry``), in every stage and Ray task.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import TypeVar

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from libs.errors import ConfigError, PinnedVersionChanged
from libs.retry import RetryPolicy

_HOST_PORT = re.compile(r"^[A-Za-z0-9.-]+:\d{1,5}$")
_PART_SIZE = 16 * 1024 * 1024
# put_bytes sends an object up to this size in one PUT. Left to itself the MinIO client splits
# anything over 5 MiB into a multipart upload of 5 MiB parts, each its own request with its
# own hashing: for our 10-30 MiB chunks that cost the client 2.4 CPU-s per GB instead of 0.9
# (measured against SeaweedFS: docs/benchmarks-journal.md). Bigger objects still go in parts.
SINGLE_PUT_BYTES = 64 * 1024 * 1024
T = TypeVar("T")
_MISSING = ("NoSuchKey", "NoSuchObject", "ResourceNotFound")


@dataclass(frozen=True)
class ObjectStoreSettings:
    """Where the object store is and how to authenticate (``endpoint`` is ``host:port``)."""

    endpoint: str
    access_key: str
    secret_key: str
    secure: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if "://" in self.endpoint:
            raise ConfigError(
                f"MINIO_ENDPOINT={self.endpoint!r} has a scheme; expected 'host:port' such as "
                "'minio:9000' (TLS is chosen with the 'secure' setting, not the endpoint)"
            )
        if not _HOST_PORT.match(self.endpoint):
            raise ConfigError(
                f"MINIO_ENDPOINT={self.endpoint!r} is not 'host:port' (for example '127.0.0.1:9000')"
            )

    def __repr__(self) -> str:  # never print the secret
        return f"ObjectStoreSettings(endpoint={self.endpoint!r}, secure={self.secure})"


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or a download says about one object."""

    key: str
    size: int
    etag: str
    modified: datetime | None = None  # from a listing; None where the store gave none


class ObjectStore:
    """Thin wrapper over the MinIO client with the operations the pipeline needs.

    Each operation is one retried unit (``settings.retry``): a transient failure anywhere in
    it (connect, a 5xx, a stream cut halfway) restarts the whole operation, so a download
    starts its file and checksum over and a listing is read again from its start.
    """

    def __init__(self, settings: ObjectStoreSettings):
        self.settings = settings
        self.policy = settings.retry
        # No transport retries here: the policy does them all, with its backoff and deadline
        # (urllib3's own would multiply with it). Each try gets the policy's call timeout.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(5.0, self.policy.call_timeout),
                                    read=self.policy.call_timeout),
            retries=False,
            maxsize=10,
        )
        self._client = Minio(
            settings.endpoint,
            access_key=settings.access_key,
            secret_key=settings.secret_key,
            secure=settings.secure,
            http_client=http,
        )

    @property
    def client(self) -> Minio:
        return self._client

    def retried(self, what: str, call: Callable[[], T]) -> T:
        """``call()`` under this store's retry policy; ``what`` names it in the final error."""
        return self.policy.call(call, what=f"{what} (object store {self.settings.endpoint})")

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` (recursively), in key order. The listing is read
        whole before the first object is yielded, so a retry never repeats objects."""

        def listing() -> list[ObjectInfo]:
            return [_info(obj) for obj in
                    self._client.list_objects(bucket, prefix=prefix, recursive=True)
                    if not obj.is_dir]

        yield from self.retried(f"list s3://{bucket}/{prefix}", listing)

    def list_page(self, bucket: str, *, after: str = "", limit: int) -> list[ObjectInfo]:
        """At most ``limit`` objects listed after the key ``after`` (recursively, in the store's
        order: by key bytes on S3 and MinIO, folder by folder on SeaweedFS): a listing that
        resumes (S3 ``start-after``), so its cost is the page asked for, not the bucket (the
        client fetches 1,000 keys per request, lazily)."""

        def listing() -> list[ObjectInfo]:
            found = (obj for obj in self._client.list_objects(
                bucket, recursive=True, start_after=after or None) if not obj.is_dir)
            return [_info(obj) for obj in islice(found, limit)]

        return self.retried(f"list s3://{bucket}/ after {after!r}", listing)

    def exists(self, bucket: str, key: str) -> bool:
        return self.stat(bucket, key) is not None

    def stat(self, bucket: str, key: str) -> ObjectInfo | None:
        """The object's size and ETag (a HEAD request), or None when there is no such key."""

        def head() -> ObjectInfo | None:
            try:
                found = self._client.stat_object(bucket, key)
            except S3Error as exc:
                if exc.code in _MISSING:
                    return None
                raise
            return ObjectInfo(key, int(found.size or 0), (found.etag or "").strip('"'))

        return self.retried(f"look up s3://{bucket}/{key}", head)

    def _changed(self, bucket: str, pin: ObjectInfo) -> PinnedVersionChanged:
        now = self.stat(bucket, pin.key)
        return PinnedVersionChanged(f"s3://{bucket}/{pin.key}", (pin.etag, pin.size),
                                    (now.etag, now.size) if now else None)

    def _get(self, bucket: str, key: str, pin: ObjectInfo | None):
        """An open GET response for ``key``: of exactly the ``pin`` version, when given."""
        if pin is None:
            return self._client.get_object(bucket, key)
        try:
            response = self._client.get_object(bucket, key,
                                               request_headers={"If-Match": f'"{pin.etag}"'})
        except S3Error as exc:
            if exc.code in ("PreconditionFailed", *_MISSING):
                raise self._changed(bucket, pin) from None
            raise
        etag = (response.headers.get("ETag") or "").strip('"')
        length = response.headers.get("Content-Length")
        if etag != pin.etag or (length is not None and int(length) != pin.size):
            response.close()
            response.release_conn()
            raise self._changed(bucket, pin)
        return response

    def size(self, bucket: str, key: str) -> int:
        """The object's size in bytes, from a HEAD request (nothing is downloaded)."""
        return self.retried(f"look up s3://{bucket}/{key}",
                            lambda: int(self._client.stat_object(bucket, key).size or 0))

    def get_bytes(self, bucket: str, key: str, max_bytes: int | None = None,
                  pin: ObjectInfo | None = None) -> bytes:
        """The object's bytes; with ``max_bytes``, at most that many are read and a larger
        object raises ``ValueError`` (it may have grown since its size was checked). With
        ``pin``, exactly that version or ``PinnedVersionChanged``."""

        def read() -> bytes:
            response = self._get(bucket, key, pin)
            try:
                if max_bytes is None:
                    return response.read()
                data = response.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise ValueError(f"s3://{bucket}/{key} is larger than {max_bytes:,} bytes")
                return data
            finally:
                response.close()
                response.release_conn()

        return self.retried(f"read s3://{bucket}/{key}", read)

    def download(self, bucket: str, key: str, path: Path, max_bytes: int | None = None,
                 pin: ObjectInfo | None = None) -> str:
        """Stream an object to ``path``; returns its sha256 (hex) computed on the way. With
        ``max_bytes``, stops with ``ValueError`` once more than that many arrived. With
        ``pin``, exactly that version or ``PinnedVersionChanged``."""

        def fetch() -> str:
            digest = hashlib.sha256()
            response = self._get(bucket, key, pin)
            received = 0
            try:
                with open(path, "wb") as out:
                    for block in response.stream(1024 * 1024):
                        received += len(block)
                        if max_bytes is not None and received > max_bytes:
                            raise ValueError(
                                f"s3://{bucket}/{key} is larger than {max_bytes:,} bytes")
                        digest.update(block)
                        out.write(block)
            finally:
                response.close()
                response.release_conn()
            return digest.hexdigest()

        return self.retried(f"download s3://{bucket}/{key}", fetch)

    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str) -> str:
        """Write an object; returns the sha256 (hex) of what was written."""
        self.write_bytes(bucket, key, data, content_type)
        return hashlib.sha256(data).hexdigest()

    def write_bytes(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        """Write an object whose checksum nobody records (intermediate chunks): hashing it
        would cost ~1 CPU-s per GB for nothing."""
        self.retried(f"write s3://{bucket}/{key}", lambda: self._client.put_object(
            bucket, key, io.BytesIO(data), length=len(data), content_type=content_type,
            part_size=SINGLE_PUT_BYTES))

    def upload(self, bucket: str, key: str, path: Path, content_type: str) -> str:
        """Upload a local file; returns its sha256 (hex)."""
        digest = hashlib.sha256()
        with open(path, "rb") as src:
            for block in iter(lambda: src.read(1024 * 1024), b""):
                digest.update(block)
        self.retried(f"upload {path.name} to s3://{bucket}/{key}", lambda: self._client.fput_object(
            bucket, key, str(path), content_type=content_type, part_size=_PART_SIZE))
        return digest.hexdigest()

    def delete_prefix(self, bucket: str, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many were deleted."""
        if not prefix or not prefix.endswith("/"):
            raise ValueError(f"refusing to delete a prefix that is not a folder: {prefix!r}")
        keys = [o.key for o in self.list(bucket, prefix)]
        self.delete_many(bucket, keys)
        return len(keys)

    def delete(self, bucket: str, key: str) -> None:
        self.retried(f"delete s3://{bucket}/{key}", lambda: self._client.remove_object(bucket, key))

    def delete_many(self, bucket: str, keys: list[str]) -> None:
        """Delete ``keys`` in multi-object DELETE requests of up to 1,000 keys (S3's bound):
        one request instead of one per key. A key that is already gone is no error."""
        for start in range(0, len(keys), 1000):
            batch = keys[start:start + 1000]

            def remove(batch: list[str] = batch) -> None:
                errors = [e for e in self._client.remove_objects(
                    bucket, [DeleteObject(key) for key in batch])
                    if e.code not in _MISSING]
                if errors:
                    raise RuntimeError(f"could not delete {len(errors)} object(s) of s3://{bucket}/,"
                                       f" first {errors[0].name!r}: {errors[0].code} "
                                       f"{errors[0].message}")

            self.retried(f"delete {len(batch)} object(s) of s3://{bucket}/", remove)


def _info(obj) -> ObjectInfo:
    return ObjectInfo(obj.object_name, obj.size or 0, (obj.etag or "").strip('"'),
                      obj.last_modified)


class BackgroundPuts:
    """``write_bytes`` on ``threads`` worker threads so that producing the next object overlaps
    writing the last one; at most ``max_pending`` objects are held in memory at once (``put``
    blocks until one is written). ``then`` callbacks run on the worker thread after the write.
    The first error is raised from the next ``put`` or from ``wait``; leaving the ``with``
    block on an error drops the writes not yet started."""

    def __init__(self, store: ObjectStore, *, threads: int = 2, max_pending: int = 3):
        self._store = store
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="object-put")
        self._pending: list[Future] = []
        self._max_pending = max(1, max_pending)

    def put(self, bucket: str, key: str, data: bytes, content_type: str,
            then: Callable[[], None] | None = None) -> Future:
        """Queue the write; the returned future is done when the object is written."""
        self._reap(block=len(self._pending) >= self._max_pending)

        def write() -> None:
            self._store.write_bytes(bucket, key, data, content_type)
            if then is not None:
                then()

        future = self._pool.submit(write)
        self._pending.append(future)
        return future

    def wait(self) -> None:
        """Every write done; raises the first error."""
        while self._pending:
            self._reap(block=True)

    def _reap(self, *, block: bool) -> None:
        if not self._pending:
            return
        done, _ = wait(self._pending, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in done:
            self._pending.remove(future)
            future.result()

    def __enter__(self) -> BackgroundPuts:
        return self

    def __exit__(self, kind, error, trace) -> None:
        self._pool.shutdown(wait=True, cancel_futures=kind is not None)
