"""Outages on the real local stack: the object store gone for 5 s mid-shard and mid-transform
(a proxy in front of the real S3 refuses or swallows connections) is ridden out by the retry
policy, with a lake identical to a clean run's; PostgreSQL restarted mid-COPY or mid-join fails the run
naming the cause, and re-execution from the failure publishes the batch; the ledger rides out
MongoDB unreachable for a few seconds (a proxy in front of the real server); MongoDB gone at a
sensor tick (at the batch's claim) loses no batch and gives it exactly one run; gone at
the lineage write fails the run with the lake unchanged, and re-execution publishes the batch
with its lineage."""

import hashlib
import io
import json
import math
import threading
import time

import psycopg
import pyarrow.parquet as pq
import pytest
from dagster import (
    DagsterInstance,
    EnvVar,
    ReexecutionOptions,
    SensorResult,
    execute_job,
    instance_for_test,
    reconstructable,
)
from pymongo import MongoClient

from devstack.postgis import Postgres
from etl_pipelines.resources import LedgerResource
from etl_pipelines.sensors.discovery import read_cursor
from libs.lake import completion_key
from libs.ledger import Ledger
from libs.retry import RetryPolicy, ServiceUnavailable
from tests.integration.faulty_proxy import FaultyProxy
from tests.integration.pipeline import land_sample, request_for, run_ingest, sensor_tick
from tests.integration.reexecutable import (
    ingest_batch_job,
    ingest_batch_job_with_a_short_ledger_budget,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
POINTS = 40_000
PG_POINTS = 200_000
OUTAGE_SECONDS = 5.0


def _run(instance, batch_id: str, job=ingest_batch_job, **shard_config):
    request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
    config = json.loads(json.dumps(request.run_config))
    config["ops"]["shard_batch"] = {"config": {"chunk_rows": 10_000, **shard_config}}
    return execute_job(reconstructable(job), instance, run_config=config, tags=request.tags)


def _failure_chain(result, step: str) -> tuple[list, str]:
    """The step's error, then its causes, and all of them as text."""
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == step, failure.step_key
    chain = [failure.step_failure_data.error]
    while chain[-1].cause is not None:
        chain.append(chain[-1].cause)
    return chain, "\n".join(e.to_string() for e in chain)


def _lake(store, batch_id: str) -> dict[str, dict]:
    """Per dataset (batch id replaced by ``<batch>``): rows, and each part's sha256 (checked
    against the object itself) or, for a join result, its rows read back.

    A join result's bytes differ between two clean runs: PostgreSQL sums the floats of an
    aggregate in whatever order its plan meets the rows, so ``value_sum`` and ``value_mean``
    differ in their last bits. Layers are compared byte for byte, join results by value."""
    manifest = json.loads(store.get_bytes("data-lake", completion_key(batch_id)))
    lake = {}
    for name, dataset in manifest["datasets"].items():
        shas, tables = [], []
        for entry in dataset["objects"]:
            data = store.get_bytes("data-lake", entry["key"])
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["key"]
            shas.append(entry["sha256"])
            tables.append(pq.read_table(io.BytesIO(data)).to_pylist())
        described = {"rows": dataset["rows"]}
        if dataset.get("kind") == "join":
            described["content"] = [row for table in tables for row in table]
        else:
            described["sha256"] = shas
        lake[name.replace(batch_id, "<batch>")] = described
    return lake


def _same_rows(rows: list[dict], clean: list[dict]) -> bool:
    """Equal rows, floats equal to 12 significant digits (summation order aside)."""
    def same(a, b) -> bool:
        if isinstance(a, float) and isinstance(b, float):
            return math.isclose(a, b, rel_tol=1e-12)
        return a == b

    return len(rows) == len(clean) and all(
        row.keys() == other.keys() and all(same(row[k], other[k]) for k in row)
        for row, other in zip(rows, clean, strict=True))


@pytest.fixture
def proxied_store(stack_env, monkeypatch):
    """A proxy in front of the real S3, which every resource of the run (and every Ray task
    it starts) goes through."""
    host, port = stack_env["MINIO_ENDPOINT"].split(":")
    proxy = FaultyProxy(host, int(port))
    monkeypatch.setenv("MINIO_ENDPOINT", proxy.endpoint)
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def clean_lake(stack_env, store, landing_store, tmp_path_factory):
    """The lake of a clean run of the sample batch (same seed, same size)."""
    batch_id = f"outage-clean-{time.time_ns():x}"
    land_sample(landing_store, tmp_path_factory.mktemp("clean"), batch_id, n_points=POINTS)
    with instance_for_test() as instance:
        assert _run(instance, batch_id).success
    return _lake(store, batch_id)


@pytest.mark.parametrize("stage, marker, mode, shard_config", [
    # the plug is pulled once the shard op has written its second chunk of points (the
    # transforms it starts early on Ray lose the store too)
    ("shard", b"/chunks/points/chunk-00001.parquet", "refuse", {}),
    # shard finished first; the store disappears once a Ray task has written a transformed
    # chunk, and swallows connections rather than refusing them
    ("transform", b"/transformed/points/chunk-00000.parquet", "blackhole",
     {"transform_early": False}),
])
def test_the_object_store_gone_for_5_s_is_ridden_out_and_the_lake_is_identical(
        stage, marker, mode, shard_config, store, landing_store, tmp_path, batch_id,
        proxied_store, clean_lake):
    land_sample(landing_store, tmp_path, batch_id, n_points=POINTS)
    with instance_for_test() as instance:
        proxied_store.go_down_after(marker, for_seconds=OUTAGE_SECONDS, mode=mode)
        result = _run(instance, batch_id, **shard_config)
        assert result.success, f"the run failed despite the retries ({stage}, {mode})"
    assert len(proxied_store.outages) == 1, f"the outage never happened during {stage}"
    went_down, came_up = proxied_store.outages[0]
    assert came_up is not None and came_up - went_down >= OUTAGE_SECONDS
    assert proxied_store.turned_away > 0, "nothing tried the store while it was down"
    lake = _lake(store, batch_id)
    assert lake.keys() == clean_lake.keys()
    for name, clean in clean_lake.items():
        assert lake[name]["rows"] == clean["rows"], name
        if "sha256" in clean:
            assert lake[name]["sha256"] == clean["sha256"], f"{name}: parts differ"
        else:
            assert _same_rows(lake[name]["content"], clean["content"]), f"{name}: rows differ"
    assert lake["points"]["rows"] == POINTS


class StatementWatcher(threading.Thread):
    """Restarts PostgreSQL (pg_ctl stop -m fast, then start) as soon as an active statement
    matching ``pattern`` (an ILIKE pattern) shows in pg_stat_activity."""

    def __init__(self, settings, postgres: Postgres, pattern: str):
        super().__init__(daemon=True)
        self.settings, self.postgres, self.pattern = settings, postgres, pattern
        self.restarted = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with psycopg.connect(host=self.settings.host, port=self.settings.port,
                                     user=self.settings.user, password=self.settings.password,
                                     dbname=self.settings.dbname, autocommit=True) as conn:
                    while not self.stop.is_set():
                        running = conn.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE %s "
                            "AND state = 'active'", (self.pattern,)).fetchone()[0]
                        if running:
                            break
                        time.sleep(0.02)
            except psycopg.Error:
                time.sleep(0.2)
                continue
            if self.stop.is_set():
                return
            self.postgres.stop()
            self.postgres.spawn()
            self.postgres.wait_ready()
            self.restarted.set()
            return


@pytest.mark.parametrize("stage, pattern", [
    # 20 chunks of points, COPYed one after another (BRIN order): a window the watcher sees
    ("copy", "COPY %etl_run_%FROM STDIN%"),
    # the join's result table (CREATE UNLOGGED TABLE are its helper tables)
    ("join", "CREATE TABLE %etl_run_% AS %"),
])
def test_postgres_restarted_mid_stage_fails_naming_the_cause_and_reexecution_publishes(
        stage, pattern, stack_env, store, landing_store, tmp_path, batch_id, postgis_settings):
    land_sample(landing_store, tmp_path, batch_id, n_points=PG_POINTS)
    watcher = StatementWatcher(postgis_settings, Postgres(stack_env), pattern)
    with instance_for_test() as instance:
        watcher.start()
        try:
            failed = _run(instance, batch_id)
        finally:
            watcher.stop.set()
            watcher.join(timeout=120)
        assert watcher.restarted.is_set(), f"no {stage} was seen: the restart never happened"
        assert not failed.success
        chain, text = _failure_chain(failed, "load_and_join")
        raised = chain[1]
        # the error the op raised is the real one, naming it (no cleanup error took its
        # place), and the server's own words are chained under it
        assert raised.cls_name == "LoadError", text
        assert "connection" in raised.message.lower(), raised.message
        assert any(cause in text for cause in (
            "terminating connection due to administrator command", "server closed the connection",
            "connection is lost", "the database system is shutting down",
            "the database system is starting up", "Connection refused")), text
        assert "drop" not in raised.message.lower() or "janitor" in raised.message, text
        assert not store.exists("data-lake", completion_key(batch_id))

        again = execute_job(reconstructable(ingest_batch_job), instance,
                            reexecution_options=ReexecutionOptions.from_failure(
                                failed.run_id, instance))
        assert again.success
    manifest = json.loads(store.get_bytes("data-lake", completion_key(batch_id)))
    assert manifest["datasets"]["points"]["rows"] == PG_POINTS
    with psycopg.connect(host=postgis_settings.host, port=postgis_settings.port,
                         user=postgis_settings.user, password=postgis_settings.password,
                         dbname=postgis_settings.dbname) as conn:
        schemas = {row[0] for row in conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'etl\\_run\\_%%'")}
    run_ids = {failed.run_id.replace("-", ""), again.run_id.replace("-", "")}
    assert not {s for s in schemas if s.removeprefix("etl_run_") in run_ids}, \
        "the run schemas were dropped (by a new connection after the restart, or after success)"


def test_the_ledger_rides_out_mongodb_unreachable_and_names_the_call_when_it_stays_down(
        stack_env):
    uri = stack_env["MONGO_CONNECTION_STRING"]
    address = uri.split("@", 1)[1].split("/", 1)[0]
    host, port = address.rsplit(":", 1)
    proxy = FaultyProxy(host, int(port))
    client = MongoClient(uri.replace(address, proxy.endpoint), serverSelectionTimeoutMS=1000,
                         tz_aware=True)
    ledger = Ledger(client, policy=RetryPolicy(attempts=20, deadline=20.0, call_timeout=1.0))
    run_id = f"outage-ledger-{time.time_ns():x}"
    try:
        ledger.record_run(run_id, status="STARTED")
        proxy.take_down()
        threading.Timer(3.0, proxy.bring_up).start()
        ledger.record_run(run_id, status="SUCCESS")  # MongoDB unreachable for its first 3 s
        assert proxy.outages[0][1] is not None, "the call ended before MongoDB came back"
        assert ledger.run(run_id)["status"] == "SUCCESS"

        proxy.take_down()
        short = Ledger(client, policy=RetryPolicy(attempts=3, base_backoff=0.1, deadline=5.0,
                                                  call_timeout=1.0))
        named = r"could not call the ledger's record_run \(MongoDB database spatial_etl\)"
        with pytest.raises(ServiceUnavailable, match=named + r".*after 3 attempt"):
            short.record_run(run_id, status="FAILURE")
    finally:
        client.close()
        proxy.close()


@pytest.fixture
def proxied_ledger(stack_env, monkeypatch):
    """A proxy in front of the real MongoDB, which the run's ledger goes through."""
    uri = stack_env["MONGO_CONNECTION_STRING"]
    address = uri.split("@", 1)[1].split("/", 1)[0]
    host, port = address.rsplit(":", 1)
    proxy = FaultyProxy(host, int(port))
    monkeypatch.setenv("MONGO_CONNECTION_STRING", uri.replace(address, proxy.endpoint))
    yield proxy
    proxy.close()


def test_mongodb_gone_at_the_lineage_write_leaves_the_lake_unchanged_and_reexecution_publishes(
        store, landing_store, tmp_path, batch_id, proxied_ledger, ledger):
    land_sample(landing_store, tmp_path, batch_id, n_points=5_000)
    job = ingest_batch_job_with_a_short_ledger_budget
    with instance_for_test() as instance:
        # the first write to the lineage collection (BSON of {"update": "lineage", ...}) never
        # reaches MongoDB, nor does anything after it until bring_up
        proxied_ledger.go_down_at(b"\x02update\x00\x08\x00\x00\x00lineage\x00")
        failed = _run(instance, batch_id, job=job)
        assert proxied_ledger.outages, "the lineage write never happened"
        assert not failed.success
        chain, text = _failure_chain(failed, "publish_batch")
        assert chain[1].cls_name == "PublishError", text
        assert "nothing new was published" in chain[1].message, chain[1].message
        assert "record_lineages" in chain[1].message and "MongoDB" in chain[1].message, text
        # not published, and none of the failed publication's parts remain
        assert not store.exists("data-lake", completion_key(batch_id))
        assert not [o.key for o in store.list("data-lake", prefix=f"points/{batch_id}/")]

        proxied_ledger.bring_up()
        again = execute_job(reconstructable(job), instance,
                            reexecution_options=ReexecutionOptions.from_failure(
                                failed.run_id, instance))
        assert again.success
    manifest = json.loads(store.get_bytes("data-lake", completion_key(batch_id)))
    assert manifest["run_id"] == again.run_id
    listed = {f"s3://data-lake/{o['key']}" for d in manifest["datasets"].values()
              for o in d["objects"]}
    lineage = ledger.lineage_for_batch(batch_id, manifest["publication"])
    assert {doc["_id"] for doc in lineage} == listed
    assert all(doc["run_id"] == again.run_id for doc in lineage)
    # the failed attempt recorded no lineage (MongoDB was gone before its first document)
    assert len(ledger.lineage_for_batch(batch_id)) == len(listed)


def test_mongodb_gone_at_a_sensor_tick_loses_no_batch_and_the_batch_gets_one_run(
        store, landing_store, tmp_path, batch_id, proxied_ledger, ledger):
    land_sample(landing_store, tmp_path, batch_id, n_points=2_000)
    # the proxied URI (the fixture set it), a short budget so the tick gives up in ~1 s
    flaky = LedgerResource(connection_string=EnvVar("MONGO_CONNECTION_STRING"), timeout_ms=500,
                           retry_deadline_seconds=1.0)
    with DagsterInstance.ephemeral() as instance:
        # MongoDB goes at the claim: the first insert into `batches` never reaches it
        proxied_ledger.go_down_at(b"\x02insert\x00\x08\x00\x00\x00batches\x00")
        down = sensor_tick(instance, focus=batch_id, ledger=flaky)
        assert proxied_ledger.outages, "the tick never tried to claim the batch"
        assert request_for(down, batch_id) is None if isinstance(down, SensorResult) else True
        assert ledger.batch(batch_id) is None, "claimed although MongoDB was gone"
        # the next tick starts from the cursor the failed one left
        cursor = down.cursor if isinstance(down, SensorResult) else None
        assert not [key for key in read_cursor(cursor) if key.startswith(f"{batch_id}/")], \
            "the manifest was marked processed"
        proxied_ledger.bring_up()
        up = sensor_tick(instance, cursor, focus=batch_id, ledger=flaky)
        request = request_for(up, batch_id)
        assert request is not None, "the batch got no run once MongoDB was back"
        again = sensor_tick(instance, up.cursor, ledger=flaky)
        assert request_for(again, batch_id) is None if isinstance(again, SensorResult) else True
        result = run_ingest(instance, request)
        assert result.success
    assert store.exists("data-lake", completion_key(batch_id))
    assert ledger.batch(batch_id)["run_ids"] == [result.run_id]
