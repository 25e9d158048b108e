"""ShardConfig.transform_early: chunk transforms start on Ray while the shard op still cuts
the next chunks; the transform op waits for them and runs the rest. The published lake is
the same with it on or off."""

import io
import json
import uuid

import pyarrow.parquet as pq
import pytest
from dagster import DagsterEventType, DagsterInstance, RunRequest

from libs.lake import completion_key
from tests.integration.pipeline import land_sample, request_for, run_ingest, sensor_tick

pytestmark = pytest.mark.integration


def _output_metadata(result, step: str) -> dict:
    for event in result.all_events:
        if event.event_type == DagsterEventType.STEP_OUTPUT and event.step_key == step:
            return {k: v.value for k, v in event.step_output_data.metadata.items()}
    raise AssertionError(f"no output event from {step}")


def _run(store, landing_store, tmp_path, early: bool):
    batch_id = f"early-{'on' if early else 'off'}-{uuid.uuid4().hex[:8]}"
    land_sample(landing_store, tmp_path, batch_id, n_points=20_000)
    with DagsterInstance.ephemeral() as instance:
        request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
        config = dict(request.run_config)
        config["ops"] = {**config["ops"], "shard_batch": {"config": {
            "chunk_rows": 2_000, "transform_early": early}}}
        result = run_ingest(instance, RunRequest(run_key=request.run_key, run_config=config,
                                                 tags=request.tags))
    completion = json.loads(store.get_bytes("data-lake", completion_key(batch_id)))
    return result, completion


def _points(store, completion):
    tables = [pq.read_table(io.BytesIO(store.get_bytes("data-lake", o["key"])))
              for o in completion["datasets"]["points"]["objects"]]
    return sorted((t.column("point_id").to_pylist(), t.column("geometry").to_pylist())
                  for t in tables)


def test_transforms_start_during_the_shard_and_the_lake_is_the_same(
        stack_env, store, landing_store, tmp_path):
    on, lake_on = _run(store, landing_store, tmp_path, early=True)
    off, lake_off = _run(store, landing_store, tmp_path, early=False)
    shard_on, transform_on = (_output_metadata(on, s) for s in ("shard_batch", "transform_chunks"))
    # 10 point chunks and one of countries: some start while the shard op runs, the
    # transform op runs the others, and every chunk is transformed exactly once
    assert shard_on["transforms_started"] >= 1
    assert transform_on["chunks_started_during_shard"] == shard_on["transforms_started"]
    assert transform_on["chunks"] == shard_on["chunks"] == 11
    assert transform_on["rows_out"] == 20_177
    assert _output_metadata(off, "shard_batch")["transforms_started"] == 0
    assert _output_metadata(off, "transform_chunks")["chunks_started_during_shard"] == 0
    assert _points(store, lake_on) == _points(store, lake_off)
    for name in ("points", "countries", "points_per_country"):
        assert lake_on["datasets"][name]["rows"] == lake_off["datasets"][name]["rows"]
