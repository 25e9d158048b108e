"""A sensor tick never stops on one manifest (issue 26): poison manifests beside a valid one,
a ledger outage, a replaced manifest, and a cursor that stays bounded; real object store and
ledger, the sensor driven tick by tick."""

import json

import pytest
from dagster import DagsterInstance, SkipReason

from etl_pipelines.resources import InputLimitsResource, LedgerResource
from etl_pipelines.sensors.discovery import write_cursor
from etl_pipelines.sensors.manifests import MAX_RECENT
from libs.manifest import MANIFEST_FILENAME
from tests.integration.pipeline import land_sample, request_for, requested_nothing, sensor_tick

pytestmark = pytest.mark.integration

RUN = "00000000-0000-0000-0000-0000000000{:02d}"


@pytest.fixture
def instance():
    with DagsterInstance.ephemeral() as inst:
        yield inst


def _processed(result) -> dict[str, str]:
    return json.loads(result.cursor)["processed"]


def _land_raw(landing_store, prefix: str, raw: bytes) -> str:
    key = f"{prefix}/{MANIFEST_FILENAME}"
    landing_store.put_bytes("landing-zone", key, raw, "application/json")
    return key


def _the_record(ledger, key: str) -> dict:
    [record] = ledger.manifests_for_key(key)
    return record


def test_poison_manifests_are_recorded_invalid_and_the_valid_batch_still_runs(
        landing_store, ledger, tmp_path, batch_id, instance):
    land_sample(landing_store, tmp_path, batch_id, n_points=10)
    poison = {
        "nest": (b"[" * 200_000, "nesting deeper than 32 levels"),
        "utf8": (b'{"batch_id": "b-\xff\xfe"}', "not valid UTF-8: byte 0xff at offset 16"),
        "big": (b" " * (2 * 2**20) + b"{}", "the manifest is 2,097,154 bytes; the limit is "
                "1,048,576 bytes"),
        "small": (b'{"manifest_version": 1, "batch_id": "x"}' + b" " * 600,
                  "the manifest is 640 bytes; the limit is 600 bytes"),
    }
    keys = {name: _land_raw(landing_store, f"{batch_id}-{name}", raw)
            for name, (raw, _) in poison.items()}
    focus = [batch_id] + [f"{batch_id}-{name}" for name in poison]
    # the 2 MB one against the default 1 MiB limit, in a separate tick from the small limit
    first = sensor_tick(instance, focus=[p for p in focus if not p.endswith("-small")])
    assert request_for(first, batch_id) is not None
    small = sensor_tick(instance, focus=f"{batch_id}-small",
                        limits=InputLimitsResource(max_manifest_bytes=600))
    for name, (_, reason) in poison.items():
        record = _the_record(ledger, keys[name])
        assert record["status"] == "invalid"
        assert record["errors"][0].startswith(reason), record["errors"]
        assert keys[name] in _processed(small if name == "small" else first)
    # the cursor advanced: a second tick reads none of them again
    second = sensor_tick(instance, cursor=first.cursor)
    assert isinstance(second, SkipReason) or not [
        r for r in second.run_requests if r.tags["manifest_key"] in keys.values()]
    # and with them aged out of the cursor, the ledger remembers them (the valid batch's run
    # has started, so its record is settled too)
    ledger.attach_run(batch_id, RUN.format(1))
    aged = {k: e for k, e in _processed(first).items()
            if not k.startswith(tuple(f"{p}/" for p in focus))}
    third = sensor_tick(instance, cursor=write_cursor(aged))
    assert requested_nothing(third), third
    for key in keys.values():
        assert len(ledger.manifests_for_key(key)) == 1


def test_a_ledger_outage_leaves_the_manifest_for_the_next_tick(
        landing_store, ledger, tmp_path, batch_id, instance):
    land_sample(landing_store, tmp_path, batch_id, n_points=10)
    key = f"{batch_id}/{MANIFEST_FILENAME}"
    closed = LedgerResource(connection_string="mongodb://127.0.0.1:9/", timeout_ms=300)
    down = sensor_tick(instance, focus=batch_id, ledger=closed)
    assert isinstance(down, SkipReason) and "the ledger did not answer" in down.skip_message
    assert ledger.manifests_for_key(key) == []
    up = sensor_tick(instance, focus=batch_id)
    assert request_for(up, batch_id) is not None
    assert _the_record(ledger, key)["status"] == "accepted"


def test_a_manifest_replaced_before_its_run_started_takes_over_its_claim(
        landing_store, ledger, tmp_path, batch_id, instance):
    key = f"{batch_id}/{MANIFEST_FILENAME}"
    land_sample(landing_store, tmp_path / "v1", batch_id, n_points=10)
    first = sensor_tick(instance, focus=batch_id)
    token = request_for(first, batch_id).tags["spatial-etl/claim-token"]
    # replaced before any run started; the first tick's result is lost (as if the daemon
    # died after claiming), so the next tick starts from the old cursor
    land_sample(landing_store, tmp_path / "v2", batch_id, n_points=10,
                edit=lambda m: m)  # rewritten compact: other bytes, another ETag
    second = sensor_tick(instance, focus=batch_id)
    request = request_for(second, batch_id)
    assert request is not None and request.tags["spatial-etl/claim-token"] == token
    new_etag = _processed(second)[key]
    assert ledger.batch(batch_id)["etag"] == new_etag
    statuses = {r["etag"]: r["status"] for r in ledger.manifests_for_key(key)}
    assert statuses[new_etag] == "accepted"
    # once a run started, a replacement is refused, naming the run
    ledger.attach_run(batch_id, RUN.format(2))
    land_sample(landing_store, tmp_path / "v3", batch_id, n_points=10,
                edit=lambda m: dict(reversed(list(m.items()))))
    third = sensor_tick(instance, cursor=second.cursor)
    assert request_for(third, batch_id) is None
    [refused] = [r for r in ledger.manifests_for_key(key) if r["etag"] == _processed(third)[key]]
    assert refused["status"] == "refused"
    assert refused["errors"][0].startswith(
        f"batch id {batch_id!r} already claimed by run {RUN.format(2)}")
    assert "land a new batch id" in refused["errors"][0]
    assert ledger.batch(batch_id)["etag"] == new_etag


def test_the_cursor_stays_bounded_and_settled_entries_age_out(
        landing_store, ledger, tmp_path, batch_id, instance, store):
    land_sample(landing_store, tmp_path, batch_id, n_points=10)
    # 1,200 older manifests the ledger already holds, oldest in the cursor
    old = {f"{batch_id}-old-{i:04d}/{MANIFEST_FILENAME}": "0" * 32 for i in range(1_200)}
    for key, etag in old.items():
        ledger.record_manifest(manifest_key=key, etag=etag, status="invalid", batch_id=None,
                               errors=["planted by the test"])
    others = {o.key: o.etag for o in store.list("landing-zone")
              if o.key.endswith("/" + MANIFEST_FILENAME) and not o.key.startswith(f"{batch_id}/")}
    result = sensor_tick(instance, cursor=write_cursor({**old, **others}))
    assert request_for(result, batch_id) is not None
    processed = _processed(result)
    kept_old = [k for k in processed if k in old]
    # the oldest entries past MAX_RECENT leave once settled; the rest of the cursor is kept
    assert len(kept_old) == max(0, MAX_RECENT - len(others) - 1)
    assert kept_old == list(old)[len(old) - len(kept_old):]  # the newest of them, if any
    assert len(processed) <= max(MAX_RECENT, len(others) + 1)
    assert list(processed)[-1] == f"{batch_id}/{MANIFEST_FILENAME}"
    assert len(result.cursor) < len(write_cursor({**old, **others}))
