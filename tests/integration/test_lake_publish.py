"""Publishing to the lake: atomic (completion manifest last, switched in one conditional PUT),
run-unique part keys, and clean when the object store is unavailable or another run publishes
the same batch at once (a real SeaweedFS, behind a proxy the test takes down)."""

import hashlib
import json
import threading
import uuid

import geopandas as gpd
import pytest
import shapely

from libs.descriptors import StagedPart
from libs.errors import PublishConflictError, PublishError
from libs.geoparquet import to_geoparquet_bytes
from libs.lake import completion_key, publish_to_lake, put_completion_manifest
from libs.object_store import ObjectStore, ObjectStoreSettings
from libs.retry import RetryPolicy
from tests.integration.faulty_proxy import FaultyProxy

pytestmark = pytest.mark.integration
#: A budget the proxy's outage outlasts, so the test sees the store give up.
SHORT_RETRY = RetryPolicy(attempts=3, base_backoff=0.05, max_backoff=0.1, deadline=2.0)
#: A budget that outlasts an outage the test ends itself.
PATIENT_RETRY = RetryPolicy(attempts=12, base_backoff=0.1, max_backoff=0.5, deadline=30.0)


@pytest.fixture
def stage(store):
    """stage(tag): three staged one-row parts whose bytes depend on ``tag`` (two publications
    of different content tell their parts apart by sha256)."""
    prefixes = []

    def staged(tag: str = "a") -> list[StagedPart]:
        prefix = f"tests/publish-{uuid.uuid4().hex[:8]}/"
        prefixes.append(prefix)
        parts = []
        for number in range(3):
            frame = gpd.GeoDataFrame({"n": [number], "tag": [tag]},
                                     geometry=[shapely.Point(number, number)], crs="EPSG:4326")
            data = to_geoparquet_bytes(frame)
            key = f"{prefix}part-{number}.parquet"
            sha = store.put_bytes("etl-staging", key, data, "application/vnd.apache.parquet")
            parts.append(StagedPart(key, 1, len(data), sha))
        return parts

    yield staged
    for prefix in prefixes:
        store.delete_prefix("etl-staging", prefix)


@pytest.fixture
def staged(stage):
    return stage("a")


@pytest.fixture
def proxy(stack_env):
    host, port = stack_env["MINIO_ENDPOINT"].split(":")
    proxy = FaultyProxy(host, int(port))
    yield proxy
    proxy.close()


@pytest.fixture
def through_proxy(stack_env, proxy):
    """through_proxy(retry): the pipeline identity, reaching the object store through
    ``proxy`` with the retry budget ``retry`` (SHORT_RETRY unless said otherwise)."""
    def store_with(retry: RetryPolicy = SHORT_RETRY) -> ObjectStore:
        return ObjectStore(ObjectStoreSettings(proxy.endpoint, stack_env["MINIO_ROOT_USER"],
                                               stack_env["MINIO_ROOT_PASSWORD"], retry=retry))
    return store_with


def _publish(store, batch_id, parts, run_id="r1", **kwargs):
    return publish_to_lake(store, staging_bucket="etl-staging", lake_bucket="data-lake",
                           batch_id=batch_id, run_id=run_id, datasets={"things": parts},
                           dataset_info={"things": {"kind": "layer"}}, **kwargs)


def _lake_keys(store, batch_id) -> list[str]:
    return sorted(o.key for o in store.list("data-lake", f"things/{batch_id}/"))


def _published(store, batch_id) -> dict:
    """The live completion manifest, after checking that every object it lists exists with
    the sha256 it states."""
    manifest = json.loads(store.get_bytes("data-lake", completion_key(batch_id)))
    for entry in manifest["datasets"].values():
        for obj in entry["objects"]:
            actual = hashlib.sha256(store.get_bytes("data-lake", obj["key"])).hexdigest()
            assert actual == obj["sha256"], f"{obj['key']} does not match the manifest"
    return manifest


def _keys(manifest: dict) -> list[str]:
    return sorted(o["key"] for e in manifest["datasets"].values() for o in e["objects"])


def test_unavailable_store_fails_cleanly_then_publishing_again_succeeds(
        store, staged, proxy, through_proxy):
    batch_id = f"publish-{uuid.uuid4().hex[:8]}"
    proxy.take_down()
    with pytest.raises(PublishError, match=f"batch '{batch_id}'.*nothing new was published"):
        _publish(through_proxy(), batch_id, staged)
    assert not store.exists("data-lake", completion_key(batch_id))
    assert _lake_keys(store, batch_id) == []

    proxy.bring_up()
    manifest = _publish(through_proxy(), batch_id, staged)
    publication = manifest["publication"]
    assert publication.startswith("r1.")
    keys = [o["key"] for o in manifest["datasets"]["things"]["objects"]]
    assert keys == [f"things/{batch_id}/{publication}/part-{n:05d}.parquet" for n in range(3)]
    assert _published(store, batch_id) == manifest


def test_republishing_writes_new_keys_and_removes_the_old_ones_after_the_switch(
        store, stage):
    batch_id = f"publish-{uuid.uuid4().hex[:8]}"
    first = _publish(store, batch_id, stage("a"))
    # the same run publishing again (an op retried in its run) gets keys of its own, too
    again = _publish(store, batch_id, stage("b"))
    assert not set(_keys(first)) & set(_keys(again)), "never written over the live keys"
    assert _keys(_published(store, batch_id)) == _keys(again)
    assert _lake_keys(store, batch_id) == _keys(again), "the first publication's parts are gone"
    fewer = _publish(store, batch_id, stage("c")[:1], run_id="r2")
    assert _lake_keys(store, batch_id) == _keys(fewer) == _keys(_published(store, batch_id))


def test_a_failed_copy_removes_the_copies_that_succeeded_beside_it(store, staged):
    """Copies run several at a time: when one fails (a staged part that is not there), the
    parts copied around it are removed again and no completion manifest is written."""
    batch_id = f"publish-{uuid.uuid4().hex[:8]}"
    missing = StagedPart(staged[0].staging_key.replace("part-0", "part-missing"), 1, 1, "0" * 64)
    parts = [*staged, missing, *staged, *staged]
    with pytest.raises(PublishError, match=f"batch '{batch_id}'.*part-missing"):
        _publish(store, batch_id, parts, copy_threads=3)
    assert not store.exists("data-lake", completion_key(batch_id))
    assert _lake_keys(store, batch_id) == []


def test_a_republish_that_dies_mid_copy_leaves_the_published_batch_intact(
        store, stage, proxy, through_proxy):
    """Run r2 republishes and loses the object store after its first part: the live manifest
    (run r1's) and every object it lists are untouched; r3 then republishes, and r1's parts
    go once r3's manifest is in place."""
    batch_id = f"publish-{uuid.uuid4().hex[:8]}"
    live = _publish(store, batch_id, stage("a"))
    proxy.go_down_after(b"/part-00000.parquet")
    with pytest.raises(PublishError, match=f"batch '{batch_id}'.*nothing new was published"):
        _publish(through_proxy(), batch_id, stage("b"), run_id="r2", copy_threads=1)
    assert _published(store, batch_id) == live
    # r2's one copied part could not be removed (the store was gone): no manifest names it
    leftovers = set(_lake_keys(store, batch_id)) - set(_keys(live))
    assert all("/r2." in key for key in leftovers) and len(leftovers) <= 1

    final = _publish(store, batch_id, stage("c"), run_id="r3")
    assert _published(store, batch_id) == final
    assert set(_lake_keys(store, batch_id)) == set(_keys(final)) | leftovers
    assert not set(_keys(live)) & set(_lake_keys(store, batch_id)), "r1's parts are gone"


def test_of_two_runs_publishing_one_batch_at_once_the_later_switch_fails_and_cleans_up(
        store, stage, proxy, through_proxy):
    """r2 reads the live manifest, copies a part, then loses the object store; while it
    retries, r3 publishes the batch. When r2 gets through, its conditional switch finds r3's
    manifest instead of the one it read: it fails, naming the batch, removes its own parts and
    none of r3's."""
    batch_id = f"publish-{uuid.uuid4().hex[:8]}"
    _publish(store, batch_id, stage("a"))
    mine, theirs = stage("b"), stage("c")
    proxy.go_down_after(b"/part-00000.parquet")
    outcome: dict = {}

    def publish_r2() -> None:
        try:
            outcome["manifest"] = _publish(through_proxy(PATIENT_RETRY), batch_id, mine,
                                           run_id="r2", copy_threads=1)
        except Exception as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    r2 = threading.Thread(target=publish_r2)
    r2.start()
    waited = threading.Event()
    while not proxy.down and r2.is_alive():
        waited.wait(0.05)
    assert proxy.down, f"r2 ended before the proxy went down: {outcome}"
    winner = _publish(store, batch_id, theirs, run_id="r3")
    proxy.bring_up()
    r2.join()

    error = outcome.get("error")
    assert isinstance(error, PublishConflictError), outcome
    assert f"batch '{batch_id}': another run published" in str(error)
    assert "re-execute" in str(error)
    assert _published(store, batch_id) == winner
    assert _lake_keys(store, batch_id) == _keys(winner), "r2 removed its parts, not r3's"


def test_the_manifest_switch_is_conditional_on_what_was_read(store):
    """The object store itself refuses a stale switch (SeaweedFS here, MinIO in compose)."""
    batch_id = f"publish-{uuid.uuid4().hex[:8]}"
    put_completion_manifest(store, "data-lake", batch_id, b'{"v": 1}', None)
    with pytest.raises(PublishConflictError, match="expected no manifest"):
        put_completion_manifest(store, "data-lake", batch_id, b'{"v": 2}', None)
    with pytest.raises(PublishConflictError, match="expected ETag 0+;"):
        put_completion_manifest(store, "data-lake", batch_id, b'{"v": 3}', "0" * 32)
    assert json.loads(store.get_bytes("data-lake", completion_key(batch_id))) == {"v": 1}
    store.delete("data-lake", completion_key(batch_id))
