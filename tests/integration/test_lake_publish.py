"""Publishing to the lake: atomic (completion manifest last), idempotent, and clean when the
object store is unavailable (a real SeaweedFS behind a proxy the test takes down)."""

import json
import uuid

import geopandas as gpd
import pytest
import shapely

from libs.descriptors import StagedPart
from libs.errors import PublishError
from libs.geoparquet import to_geoparquet_bytes
from libs.lake import completion_key, publish_to_lake
from libs.object_store import ObjectStore, ObjectStoreSettings
from libs.retry import RetryPolicy
from tests.integration.faulty_proxy import FaultyProxy

pytestmark = pytest.mark.integration
#: A budget the proxy's outage outlasts, so the test sees the store give up.
SHORT_RETRY = RetryPolicy(attempts=3, base_backoff=0.05, max_backoff=0.1, deadline=2.0)


@pytest.fixture
def staged(store):
    prefix = f"tests/publish-{uuid.uuid4().hex[:8]}/"
    parts = []
    for number in range(3):
        frame = gpd.GeoDataFrame({"n": [number]}, geometry=[shapely.Point(number, number)],
                                 crs="EPSG:4326")
        data = to_geoparquet_bytes(frame)
        key = f"{prefix}part-{number}.parquet"
        sha = store.put_bytes("etl-staging", key, data, "application/vnd.apache.parquet")
        parts.append(StagedPart(key, 1, len(data), sha))
    yield parts
    store.delete_prefix("etl-staging", prefix)


@pytest.fixture
def proxy(stack_env):
    host, port = stack_env["MINIO_ENDPOINT"].split(":")
    proxy = FaultyProxy(host, int(port))
    yield proxy
    proxy.close()


def _publish(store, batch_id, parts, **kwargs):
    return publish_to_lake(store, staging_bucket="etl-staging", lake_bucket="data-lake",
                           batch_id=batch_id, run_id="r1", datasets={"things": parts},
                           dataset_info={"things": {"kind": "layer"}}, **kwargs)


def test_unavailable_store_fails_cleanly_then_publishing_again_succeeds(
        stack_env, store, staged, proxy):
    batch_id = f"publish-{uuid.uuid4().hex[:8]}"
    flaky = ObjectStore(ObjectStoreSettings(proxy.endpoint, stack_env["MINIO_ROOT_USER"],
                                            stack_env["MINIO_ROOT_PASSWORD"], retry=SHORT_RETRY))
    proxy.take_down()
    with pytest.raises(PublishError, match=f"batch '{batch_id}'.*nothing new was published"):
        _publish(flaky, batch_id, staged)
    assert not store.exists("data-lake", completion_key(batch_id))
    assert list(store.list("data-lake", f"things/{batch_id}/")) == []

    proxy.bring_up()
    manifest = _publish(flaky, batch_id, staged)
    keys = [o["key"] for o in manifest["datasets"]["things"]["objects"]]
    assert keys == [f"things/{batch_id}/part-{n:05d}.parquet" for n in range(3)]
    assert json.loads(store.get_bytes("data-lake", completion_key(batch_id))) == manifest


def test_republishing_gives_the_same_object_set_and_removes_what_is_gone(store, staged):
    batch_id = f"publish-{uuid.uuid4().hex[:8]}"
    first = _publish(store, batch_id, staged)
    again = _publish(store, batch_id, staged)
    listed = sorted(o.key for o in store.list("data-lake", f"things/{batch_id}/"))
    assert listed == sorted(o["key"] for o in again["datasets"]["things"]["objects"])
    assert first["datasets"] == again["datasets"]
    fewer = _publish(store, batch_id, staged[:1])
    listed = sorted(o.key for o in store.list("data-lake", f"things/{batch_id}/"))
    assert listed == [o["key"] for o in fewer["datasets"]["things"]["objects"]]


def test_a_failed_copy_removes_the_copies_that_succeeded_beside_it(store, staged):
    """Copies run several at a time: when one fails (a staged part that is not there), the
    parts copied around it are removed again and no completion manifest is written."""
    batch_id = f"publish-{uuid.uuid4().hex[:8]}"
    missing = StagedPart(staged[0].staging_key.replace("part-0", "part-missing"), 1, 1, "0" * 64)
    parts = [*staged, missing, *staged, *staged]
    with pytest.raises(PublishError, match=f"batch '{batch_id}'.*part-missing"):
        _publish(store, batch_id, parts, copy_threads=3)
    assert not store.exists("data-lake", completion_key(batch_id))
    assert list(store.list("data-lake", f"things/{batch_id}/")) == []
