"""The manifest sensor against the real object store and ledger."""

import json

import pytest
from dagster import DagsterInstance, SkipReason

from libs.landing import land_batch
from libs.sample_batch import write_sample_batch
from tests.integration.pipeline import land_sample, request_for, requested_nothing, sensor_tick

pytestmark = pytest.mark.integration


@pytest.fixture
def instance():
    with DagsterInstance.ephemeral() as inst:
        yield inst


def _cursor(result) -> dict:
    return json.loads(result.cursor)


def test_valid_manifest_requests_one_run_keyed_by_batch_id(landing_store, tmp_path, batch_id, instance):
    land_sample(landing_store, tmp_path, batch_id, n_points=100)
    first = sensor_tick(instance, focus=[batch_id, f"{batch_id}-again"])
    request = request_for(first, batch_id)
    assert request.run_key == batch_id
    assert request.tags["batch_id"] == batch_id
    config = request.run_config["ops"]["validate_batch"]["config"]
    assert config == {"manifest_key": f"{batch_id}/manifest.json", "batch_id": batch_id}
    cursor = _cursor(first)
    assert cursor["version"] == 3 and f"{batch_id}/manifest.json" in cursor["processed"]
    second = sensor_tick(instance, cursor=first.cursor)
    assert isinstance(second, SkipReason) or request_for(second, batch_id) is None


def test_invalid_manifest_is_recorded_with_every_error_and_never_retried(
        landing_store, tmp_path, batch_id, instance, ledger):
    def break_it(manifest):
        manifest["target_crs"] = "EPSG:0"
        manifest["join"]["right"] = "rivers"
        return manifest

    land_sample(landing_store, tmp_path, batch_id, n_points=10, edit=break_it)
    key = f"{batch_id}/manifest.json"
    first = sensor_tick(instance, focus=[batch_id, f"{batch_id}-again"])
    assert request_for(first, batch_id) is None
    assert key in _cursor(first)["processed"]
    (record,) = ledger.manifests_for_key(key)
    assert record["status"] == "invalid"
    assert any(e.startswith("target_crs:") for e in record["errors"])
    assert any("join.right: layer 'rivers'" in e for e in record["errors"])
    second = sensor_tick(instance, cursor=first.cursor)
    assert isinstance(second, SkipReason) or key not in [
        r.run_config["ops"]["validate_batch"]["config"]["manifest_key"]
        for r in second.run_requests]
    assert len(ledger.manifests_for_key(key)) == 1


def test_a_batch_id_never_starts_a_second_run_even_under_a_new_key(
        landing_store, tmp_path, batch_id, instance, ledger):
    land_sample(landing_store, tmp_path, batch_id, n_points=10)
    first = sensor_tick(instance, focus=[batch_id, f"{batch_id}-again"])
    assert request_for(first, batch_id) is not None
    ledger.attach_run(batch_id, "00000000-0000-0000-0000-000000000001")  # its run started
    # the same batch id landed again under another folder
    copy_dir = tmp_path / "again"
    write_sample_batch(copy_dir, batch_id, n_points=10)
    land_batch(landing_store, copy_dir, f"{batch_id}-again")
    second = sensor_tick(instance, cursor=first.cursor)
    assert request_for(second, batch_id) is None
    (record,) = ledger.manifests_for_key(f"{batch_id}-again/manifest.json")
    assert record["status"] == "duplicate_batch"
    assert f"{batch_id}/manifest.json" in record["errors"][0]
    # and a fresh cursor (e.g. a reset sensor) does not bring the started batch back either:
    # the ledger remembers both manifests, so the tick has nothing to do
    reset = sensor_tick(instance, focus=[batch_id, f"{batch_id}-again"])
    assert requested_nothing(reset), reset
