"""How the manifest sensor finds manifests (docs/manifest-discovery.md), on the real store.

Each test gets its own bucket as the sensor's landing bucket, so the key order is the
test's; the page sizes are made small so that a handful of objects spans many pages.
"""

import math
import uuid

import pytest
from dagster import DagsterInstance, build_sensor_context

from devstack.s3 import store_settings
from etl_pipelines.resources import InputLimitsResource, LedgerResource, ObjectStoreResource
from etl_pipelines.sensors import discovery, manifests
from libs.landing import land_batch
from libs.manifest import MANIFEST_FILENAME
from libs.object_store import ObjectStore
from libs.sample_batch import write_sample_batch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def admin(stack_env) -> ObjectStore:
    return ObjectStore(store_settings(stack_env, "admin"))


@pytest.fixture
def bucket(admin):
    name = f"discovery-{uuid.uuid4().hex[:12]}"
    admin.client.make_bucket(name)
    yield name
    for obj in admin.list(name):
        admin.delete(name, obj.key)
    admin.client.remove_bucket(name)


@pytest.fixture(scope="module")
def instance():
    with DagsterInstance.ephemeral() as inst:
        yield inst


def _tick(instance, stack_env, bucket: str, cursor: str | None):
    settings = store_settings(stack_env, "admin")
    resources = {
        "object_store": ObjectStoreResource(endpoint=settings.endpoint,
                                            access_key=settings.access_key,
                                            secret_key=settings.secret_key,
                                            landing_bucket=bucket),
        "ledger": LedgerResource(connection_string=stack_env["MONGO_CONNECTION_STRING"]),
        "input_limits": InputLimitsResource(),
    }
    with build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        result = manifests.manifest_sensor(context)
    # a skip that moved nothing returns a bare SkipReason: the cursor stays as it was
    return result, getattr(result, "cursor", None) or cursor


def _put(store: ObjectStore, bucket: str, key: str, data: bytes = b"x") -> str:
    store.write_bytes(bucket, key, data, "application/octet-stream")
    return [o.etag for o in store.list(bucket, key)][0]


def test_a_manifest_sorting_before_the_position_is_found_by_the_sweep(
        admin, bucket, instance, stack_env, tmp_path, monkeypatch):
    monkeypatch.setattr(discovery, "SWEEP_PAGE", 4)
    tag = uuid.uuid4().hex[:8]
    for i in range(12):
        _put(admin, bucket, f"m-{tag}/filler-{i:02d}.bin")
    result, cursor = _tick(instance, stack_env, bucket, None)  # no position: a full listing
    assert discovery.read_position(cursor).after == f"m-{tag}/filler-11.bin"

    late, early = f"z-{tag}", f"a-{tag}"
    for name in (late, early):
        write_sample_batch(tmp_path / name, name, n_points=10)
    land_batch(admin, tmp_path / late, late, bucket=bucket)
    result, cursor = _tick(instance, stack_env, bucket, cursor)
    assert [r.run_key for r in result.run_requests] == [late]  # after the position: this tick
    last = max(o.key for o in admin.list(bucket))
    assert last.startswith(f"{late}/") and discovery.read_position(cursor).after == last

    # a key sorting before everything seen: the tail cannot see it, the sweep must
    land_batch(admin, tmp_path / early, early, bucket=bucket)
    objects = len(list(admin.list(bucket)))
    found, ticks = [], 0
    smallest_page = discovery.SWEEP_PAGE - discovery.SWEEP_PAGE // 4  # pages vary at random
    while not found and ticks <= math.ceil(objects / smallest_page) + 1:
        result, cursor = _tick(instance, stack_env, bucket, cursor)
        found = [r for r in getattr(result, "run_requests", None) or [] if r.run_key == early]
        ticks += 1
    assert found, f"{early} not found in {ticks} ticks over {objects} objects"
    config = found[0].run_config["ops"]["validate_batch"]["config"]
    assert config == {"manifest_key": f"{early}/{MANIFEST_FILENAME}", "batch_id": early}
    # the tail never went back: it is still past the late batch
    assert discovery.read_position(cursor).after == last


def test_nothing_is_missed_across_ticks_and_the_cursor_stays_bounded(
        admin, bucket, instance, stack_env, ledger, monkeypatch):
    # pages and caps far below the objects landed, so every position and hold is exercised
    monkeypatch.setattr(discovery, "SWEEP_PAGE", 5)
    monkeypatch.setattr(discovery, "TAIL_PAGE", 6)
    monkeypatch.setattr(manifests, "MAX_MANIFESTS_PER_TICK", 2)
    monkeypatch.setattr(manifests, "MAX_RECENT", 3)
    monkeypatch.setattr(discovery, "FIRST_PAGE", 3)  # even the first listing stops early
    landed: dict[tuple[str, str], int] = {}  # every manifest version landed
    cursor, ticks = None, 0

    def tick():
        nonlocal cursor, ticks
        _, cursor = _tick(instance, stack_env, bucket, cursor)
        ticks += 1
        processed = discovery.read_cursor(cursor)
        # every manifest here is invalid, so settled: pruning keeps the map at MAX_RECENT
        assert len(processed) <= manifests.MAX_RECENT, processed
        assert len(cursor.encode()) < 4 * 1100 + 200  # 3 entries and 2 position keys

    for round_ in range(6):
        for i in range(3):  # random prefixes: before, between and after what was seen
            key = f"{uuid.uuid4().hex[:6]}-{round_}-{i}/{MANIFEST_FILENAME}"
            landed[(key, _put(admin, bucket, key, b"{}"))] = 1
        _put(admin, bucket, f"{uuid.uuid4().hex[:6]}-data/part.bin")
        if round_ == 3:  # a manifest replaced once recorded: its new version is a new record
            key = next(key for key, etag in landed if ledger.manifests_for_key(key))
            landed[(key, _put(admin, bucket, key, b'{"replaced": true}'))] = 1
        tick()
    objects = len(list(admin.list(bucket)))
    bound = math.ceil(objects / 4) + math.ceil(len(landed) / 2) + 2  # sweep pages of 4-5 keys

    def missing():  # recorded invalid is settled: one query by id for all of them
        return sorted(set(landed) - ledger.settled_manifests(list(landed)))

    while missing() and ticks < 6 + bound:
        tick()
    assert not missing(), f"missed after {ticks} ticks: {missing()}"

    def records():  # one per version (the record's id is key@etag): status and when seen
        ids = [f"{key}@{etag}" for key, etag in landed]
        return {d["_id"]: (d["status"], d["seen_at"])
                for d in ledger.db.manifests.find({"_id": {"$in": ids}})}

    before = records()
    assert len(before) == len(landed) and {s for s, _ in before.values()} == {"invalid"}
    # once everything is recorded, further ticks (a whole sweep round) record nothing again
    for _ in range(math.ceil(objects / 4) + 1):
        tick()
    assert records() == before


def test_a_manifest_under_a_key_that_is_also_an_object_is_found(
        admin, bucket, instance, stack_env, ledger, monkeypatch):
    # SeaweedFS resumes a listing after "h" past everything under "h/" (MinIO does not): the
    # tail's position lands on "h" here, so only the sweep can find h/manifest.json, and a
    # sweep page ending on "h" would skip it too; its page sizes vary so a round finds it
    monkeypatch.setattr(discovery, "SWEEP_PAGE", 4)  # pages of 3 or 4 keys
    for key in ("g1", "g2", "h"):
        _put(admin, bucket, key)
    _, cursor = _tick(instance, stack_env, bucket, None)
    assert discovery.read_position(cursor).after == "h"
    key = f"h/{uuid.uuid4().hex[:8]}/{MANIFEST_FILENAME}"
    _put(admin, bucket, key, b"{}")
    ticks = 0
    while not ledger.manifests_for_key(key) and ticks < 40:  # a miss per round: p <= 1/2
        _, cursor = _tick(instance, stack_env, bucket, cursor)
        ticks += 1
    assert ledger.manifests_for_key(key), f"{key} not found in {ticks} ticks"


def test_the_pipeline_identity_lists_the_landing_zone_from_a_position(
        store, landing_store, batch_id):
    for name in ("a", "b", "c"):
        landing_store.write_bytes("landing-zone", f"{batch_id}/{name}.bin", b"x",
                                  "application/octet-stream")
    page = store.list_page("landing-zone", after=f"{batch_id}/a.bin", limit=1)
    assert [(o.key, o.size) for o in page] == [(f"{batch_id}/b.bin", 1)]  # start-after: exclusive


def test_the_tail_never_passes_a_manifest_left_for_the_next_tick(
        admin, bucket, instance, stack_env, ledger, monkeypatch):
    # no sweep at all (a page of 0 keys): only the tail's hold can find what the cap left
    monkeypatch.setattr(discovery, "SWEEP_PAGE", 0)
    monkeypatch.setattr(manifests, "MAX_MANIFESTS_PER_TICK", 2)
    _put(admin, bucket, "a/part.bin")
    _, cursor = _tick(instance, stack_env, bucket, None)
    tag = uuid.uuid4().hex[:8]
    keys = [f"b-{tag}-{i}/{MANIFEST_FILENAME}" for i in range(5)]
    for key in keys:  # all after the position, landed at once: more than one tick's cap
        _put(admin, bucket, key, b"{}")
    for _ in range(3):
        _, cursor = _tick(instance, stack_env, bucket, cursor)
    assert all(ledger.manifests_for_key(key) for key in keys), \
        [key for key in keys if not ledger.manifests_for_key(key)]
    assert discovery.read_position(cursor).after == keys[-1]
