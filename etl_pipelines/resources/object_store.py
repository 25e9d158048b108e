"""Object storage resource: MinIO in compose, SeaweedFS locally, one S3 API."""

from __future__ import annotations

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr

from libs.object_store import ObjectStore, ObjectStoreSettings
from libs.retry import RetryPolicy


class ObjectStoreResource(ConfigurableResource):
    """The S3-compatible object store holding the landing zone, the staging area and the lake."""

    endpoint: str = Field(description="'host:port' of the S3 endpoint, no scheme (MINIO_ENDPOINT)")
    access_key: str = Field(description="access key (MINIO_ROOT_USER)")
    secret_key: str = Field(description="secret key (MINIO_ROOT_PASSWORD)")
    secure: bool = Field(default=False, description="use TLS")
    landing_bucket: str = Field(default="landing-zone", description="where batches land")
    lake_bucket: str = Field(default="data-lake", description="where the export publishes")
    staging_bucket: str = Field(
        default="etl-staging", description="run-scoped intermediates (chunks, op outputs)"
    )

    retry_attempts: int = Field(
        default=10, ge=1, description="tries of one object-store call that fails transiently "
        "(connection refused/reset, timeout, 5xx, SlowDown), in every stage and Ray task")
    retry_deadline_seconds: float = Field(
        default=30.0, gt=0, description="total time one object-store call may spend on its "
        "retries (exponential backoff with jitter) before the step fails naming the call")
    call_timeout_seconds: float = Field(
        default=20.0, gt=0, description="connect/read timeout of each try of a call (a read "
        "waits this long for bytes): under the deadline, so a hung try leaves room to retry")

    _store: ObjectStore | None = PrivateAttr(default=None)

    def settings(self) -> ObjectStoreSettings:
        """Where the store is, who we are, and the retry policy (Ray tasks get it too)."""
        return ObjectStoreSettings(self.endpoint, self.access_key, self.secret_key, self.secure,
                                   retry=self.retry_policy())

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(attempts=self.retry_attempts, deadline=self.retry_deadline_seconds,
                           call_timeout=self.call_timeout_seconds)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self._store = ObjectStore(self.settings())

    @property
    def store(self) -> ObjectStore:
        if self._store is None:  # used outside a run (e.g. a sensor evaluated directly)
            self._store = ObjectStore(self.settings())
        return self._store

    def lake_uri(self, key: str) -> str:
        return f"s3://{self.lake_bucket}/{key}"
