"""No secret of the stack reaches a run's logs, metadata, stored files or the ledger.

Runs a real batch and a failing one (a mislabelled file) on an on-disk Dagster instance (event
log, run storage and compute logs in files), then looks for every secret value of the stack's
env files in: each event of both runs (messages, metadata, error info with causes), the run
records (config, tags), every byte the instance stored, and every ledger document of both
batches. Secrets: values of keys naming a PASSWORD, SECRET or TOKEN, and credentials embedded
in connection strings.
"""

import json
import urllib.parse
import uuid

import pytest
from dagster import DagsterInstance

from devstack.envfile import read_env_file
from devstack.layout import ADMIN_ENV_FILE, ENV_FILE
from tests.integration.pipeline import land_sample, request_for, run_ingest, sensor_tick

pytestmark = pytest.mark.integration


def stack_secrets() -> dict[str, str]:
    """``{where it comes from: secret value}`` for every secret the local stack holds."""
    env = read_env_file(ENV_FILE)
    if ADMIN_ENV_FILE.exists():
        env.update(read_env_file(ADMIN_ENV_FILE))
    found = {
        key: value
        for key, value in env.items()
        if any(word in key for word in ("PASSWORD", "SECRET", "TOKEN")) and value
    }
    for key, value in env.items():
        parsed = urllib.parse.urlsplit(value)
        if parsed.scheme and parsed.password:
            found[f"{key} (password)"] = urllib.parse.unquote(parsed.password)
    # MINIO_ROOT_USER is the access key of a key pair: the S3 signature never sends the
    # secret, and the access key appears in request logs by design; not a secret here.
    assert len(found) >= 4, f"expected the stack's passwords and token, found {sorted(found)}"
    return found


def leaks(text: str, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if value in text]


@pytest.fixture(scope="module")
def two_runs(stack_env, landing_store, tmp_path_factory):
    """A batch that publishes and one that fails in shard, on an on-disk instance."""
    home = tmp_path_factory.mktemp("dagster_home")
    tmp = tmp_path_factory.mktemp("batches")
    good, bad = (f"secrets-{kind}-{uuid.uuid4().hex[:8]}" for kind in ("ok", "bad"))

    def mislabel(manifest: dict) -> dict:
        for entry in manifest["files"]:
            if entry["layer"] == "points":
                entry["format"] = "geojson"  # the file is FlatGeobuf
        return manifest

    with DagsterInstance.local_temp(str(home)) as instance:
        land_sample(landing_store, tmp, good, n_points=2_000)
        land_sample(landing_store, tmp, bad, n_points=200, edit=mislabel)
        tick = sensor_tick(instance, focus=[good, bad])
        results = {
            batch: run_ingest(instance, request_for(tick, batch), raise_on_error=False)
            for batch in (good, bad)
        }
        events = {batch: instance.all_logs(result.run_id) for batch, result in results.items()}
        runs = {batch: instance.get_run_by_id(result.run_id) for batch, result in results.items()}
    return {"home": home, "results": results, "events": events, "runs": runs}


def test_the_runs_did_what_the_test_needs(two_runs):
    results = list(two_runs["results"].values())
    assert results[0].success and not results[1].success
    failures = [
        e
        for e in two_runs["events"][list(two_runs["events"])[1]]
        if e.dagster_event and e.dagster_event.event_type_value == "STEP_FAILURE"
    ]
    assert failures, "the mislabelled batch should fail a step"


def test_no_secret_in_any_event_or_run_record(two_runs):
    secrets = stack_secrets()
    for batch, events in two_runs["events"].items():
        assert events, f"no events stored for {batch}"
        for event in events:
            text = repr(event)
            error = event.dagster_event and event.dagster_event.event_specific_data
            if error is not None and getattr(error, "error", None) is not None:
                text += error.error.to_string()
            assert not leaks(text, secrets), f"{batch}: {leaks(text, secrets)} in {text[:500]}"
        run = two_runs["runs"][batch]
        record = repr(run) + json.dumps(run.run_config, default=str) + json.dumps(dict(run.tags))
        assert not leaks(record, secrets), f"{batch}: {leaks(record, secrets)} in the run record"


def test_no_secret_in_any_file_the_instance_stored(two_runs):
    """Event log and run storage (SQLite), compute logs (stdout/stderr of each step), all."""
    secrets = stack_secrets()
    files = [path for path in two_runs["home"].rglob("*") if path.is_file()]
    assert any(
        path.suffix in {".out", ".err", ".complete"} or "compute_logs" in str(path) for path in files
    ), f"no compute logs stored: {files}"
    for path in files:
        data = path.read_bytes().decode("utf-8", errors="replace")
        assert not leaks(data, secrets), f"{leaks(data, secrets)} in {path}"


def test_no_secret_in_the_ledger(two_runs, ledger):
    secrets = stack_secrets()
    db = ledger.db
    for batch, result in two_runs["results"].items():
        documents = [
            *db.batches.find({"_id": batch}),
            *db.runs.find({"batch_id": batch}),
            *db.runs.find({"_id": result.run_id}),
            *db.lineage.find({"batch_id": batch}),
            *db.manifests.find({"batch_id": batch}),
        ]
        assert documents, f"no ledger documents for {batch}"
        text = json.dumps(documents, default=str)
        assert not leaks(text, secrets), f"{batch}: {leaks(text, secrets)} in the ledger"
