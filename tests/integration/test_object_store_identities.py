"""Least privilege in the local stack's object store, with real S3 calls per identity: the
landing identity only writes landing-zone, the lake reader only reads data-lake, and the
pipeline (the contract's MINIO_ROOT_USER) reads landing-zone but can never change it."""

import uuid

import pytest
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from devstack.s3 import store_settings
from libs.object_store import ObjectStore

LANDING, STAGING, LAKE = "landing-zone", "etl-staging", "data-lake"
ORIGINAL = b"landed by a data team"


def as_identity(stack_env, identity: str) -> ObjectStore:
    return ObjectStore(store_settings(stack_env, identity))


def assert_denied(call, what: str) -> None:
    with pytest.raises(S3Error) as denied:
        call()
    assert denied.value.code == "AccessDenied", f"{what}: expected AccessDenied, got {denied.value.code}"


@pytest.fixture
def admin(stack_env) -> ObjectStore:
    # Plants and removes the objects under test in every bucket, which by design no
    # other identity can do (nobody else deletes in landing-zone).
    return as_identity(stack_env, "admin")


@pytest.fixture
def planted(admin):
    """One existing object per bucket, under a prefix of its own; removed afterwards."""
    prefix = f"identities-{uuid.uuid4().hex[:8]}/"
    keys = {bucket: f"{prefix}existing.txt" for bucket in (LANDING, STAGING, LAKE)}
    for bucket, key in keys.items():
        admin.put_bytes(bucket, key, ORIGINAL, "text/plain")
    yield prefix, keys
    for bucket in keys:
        admin.delete_prefix(bucket, prefix)


def test_landing_identity_writes_the_landing_zone_only(stack_env, admin, planted):
    prefix, keys = planted
    landing = as_identity(stack_env, "landing")
    landing.put_bytes(LANDING, f"{prefix}new.txt", b"new", "text/plain")
    assert admin.get_bytes(LANDING, f"{prefix}new.txt") == b"new"
    for bucket in (STAGING, LAKE):
        assert_denied(
            lambda b=bucket: landing.put_bytes(b, f"{prefix}new.txt", b"x", "text/plain"),
            f"landing identity writing {bucket}",
        )
        assert_denied(lambda b=bucket: landing.get_bytes(b, keys[b]), f"landing identity reading {bucket}")
    for key in (keys[LANDING], f"{prefix}new.txt"):
        assert_denied(lambda k=key: landing.delete(LANDING, k), f"landing identity deleting {key}")
        (error,) = landing.client.remove_objects(LANDING, [DeleteObject(key)])  # multi-object delete
        assert error.code == "AccessDenied", error
    assert_denied(lambda: landing.get_bytes(LANDING, keys[LANDING]), "landing identity reading landing")
    assert admin.get_bytes(LANDING, keys[LANDING]) == ORIGINAL


def test_lake_reader_reads_the_lake_and_writes_nothing(stack_env, admin, planted):
    prefix, keys = planted
    reader = as_identity(stack_env, "lake-reader")
    assert reader.get_bytes(LAKE, keys[LAKE]) == ORIGINAL
    assert [o.key for o in reader.list(LAKE, prefix)] == [keys[LAKE]]
    for bucket in (LANDING, STAGING, LAKE):
        assert_denied(
            lambda b=bucket: reader.put_bytes(b, f"{prefix}new.txt", b"x", "text/plain"),
            f"lake reader writing {bucket}",
        )
        assert_denied(
            lambda b=bucket: reader.put_bytes(b, keys[b], b"x", "text/plain"),
            f"lake reader overwriting in {bucket}",
        )
        assert_denied(lambda b=bucket: reader.delete(b, keys[b]), f"lake reader deleting in {bucket}")
    for bucket in (LANDING, STAGING):
        assert_denied(lambda b=bucket: reader.get_bytes(b, keys[b]), f"lake reader reading {bucket}")
    for bucket, key in keys.items():
        assert admin.get_bytes(bucket, key) == ORIGINAL, f"{bucket}/{key} changed"


def test_pipeline_reads_landing_but_never_changes_it(stack_env, admin, planted):
    prefix, keys = planted
    pipeline = as_identity(stack_env, "pipeline")
    assert pipeline.settings.access_key == stack_env["MINIO_ROOT_USER"]  # the contract's variable
    assert pipeline.get_bytes(LANDING, keys[LANDING]) == ORIGINAL
    assert [o.key for o in pipeline.list(LANDING, prefix)] == [keys[LANDING]]
    assert_denied(lambda: pipeline.delete(LANDING, keys[LANDING]), "pipeline deleting a landed object")
    (error,) = pipeline.client.remove_objects(LANDING, [DeleteObject(keys[LANDING])])
    assert error.code == "AccessDenied", error
    assert_denied(
        lambda: pipeline.put_bytes(LANDING, keys[LANDING], b"x", "text/plain"),
        "pipeline overwriting a landed object",
    )
    assert_denied(
        lambda: pipeline.put_bytes(LANDING, f"{prefix}new.txt", b"x", "text/plain"),
        "pipeline writing to landing-zone",
    )
    assert admin.get_bytes(LANDING, keys[LANDING]) == ORIGINAL
    assert not admin.exists(LANDING, f"{prefix}new.txt")


@pytest.mark.parametrize("bucket", [STAGING, LAKE])
def test_pipeline_writes_and_deletes_staging_and_lake(stack_env, admin, planted, bucket):
    prefix, keys = planted
    pipeline = as_identity(stack_env, "pipeline")
    pipeline.put_bytes(bucket, f"{prefix}new.txt", b"new", "text/plain")
    pipeline.put_bytes(bucket, keys[bucket], b"replaced", "text/plain")
    assert pipeline.get_bytes(bucket, keys[bucket]) == b"replaced"
    assert sorted(o.key for o in pipeline.list(bucket, prefix)) == sorted([keys[bucket], f"{prefix}new.txt"])
    assert pipeline.delete_prefix(bucket, prefix) == 2
    assert not list(admin.list(bucket, prefix))


def test_only_the_admin_creates_buckets(stack_env, admin):
    name = f"identities-{uuid.uuid4().hex[:8]}"
    for identity in ("landing", "pipeline", "lake-reader"):
        client = as_identity(stack_env, identity).client
        assert_denied(lambda c=client: c.make_bucket(name), f"{identity} creating a bucket")
    admin.client.make_bucket(name)
    admin.client.remove_bucket(name)
