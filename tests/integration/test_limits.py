"""Declared input limits on the real stack: an oversized manifest or one with too many files
is refused by the sensor; a landed file over the byte limit is refused before anything is
downloaded; a 2-million-vertex polygon becomes a reject (recipe ``reject``) or fails the
run (``fail``) naming its file, layer and row, while the Ray workers stay under their memory
requests; a chunk task past its time limit fails the run naming the chunk; a task the memory
monitor kills is retried a bounded number of times, then fails naming the task."""

import io
import json
import os
import subprocess
import sys
import textwrap

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
from dagster import DagsterInstance, EnvVar

from etl_pipelines.definitions import build_resources
from etl_pipelines.jobs.ingest import ingest_batch
from etl_pipelines.resources import InputLimitsResource, RayResource
from libs.errors import InputDataError
from libs.lake import completion_key, dataset_prefix, rejects_dataset
from libs.landing import land_batch
from libs.manifest import MANIFEST_FILENAME, DataFile
from libs.sample_batch import write_sample_batch
from libs.sharding import download_landed
from tests.integration.pipeline import land_sample, request_for, run_ingest, sensor_tick

pytestmark = pytest.mark.integration

HEAVY_VERTICES = 2_000_000


def _failure(result) -> tuple[str, str]:
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    return failure.step_key, failure.event_specific_data.error.to_string()


def _refused(ledger, key: str) -> list[str]:
    [record] = ledger.manifests_for_key(key)
    assert record["status"] == "invalid"
    return record["errors"]


def test_an_oversized_manifest_is_refused_from_its_listed_size(stack_env, store, landing_store, ledger,
                                                               tmp_path, batch_id):
    land_sample(landing_store, tmp_path, batch_id, n_points=50)
    key = f"{batch_id}/{MANIFEST_FILENAME}"
    size = store.size("landing-zone", key)
    with DagsterInstance.ephemeral() as instance:
        result = sensor_tick(instance, focus=batch_id,
                             limits=InputLimitsResource(max_manifest_bytes=size - 1))
    assert request_for(result, batch_id) is None
    assert json.loads(result.cursor)["processed"][key]  # one-shot: not looked at again
    assert _refused(ledger, key) == [
        f"the manifest is {size:,} bytes; the limit is {size - 1:,} bytes: split the batch "
        "into several manifests"]


def test_a_manifest_with_too_many_files_is_refused(stack_env, store, landing_store, ledger,
                                                   tmp_path, batch_id):
    land_sample(landing_store, tmp_path, batch_id, n_points=50)
    key = f"{batch_id}/{MANIFEST_FILENAME}"
    with DagsterInstance.ephemeral() as instance:
        result = sensor_tick(instance, focus=batch_id,
                             limits=InputLimitsResource(max_files_per_manifest=1))
    assert request_for(result, batch_id) is None
    assert key in json.loads(result.cursor)["processed"]
    assert _refused(ledger, key) == [
        "files: 2 files listed; the limit is 1 per manifest: split the batch into several "
        "manifests"]


def test_a_file_over_the_byte_limit_is_refused_before_anything_is_downloaded(
        stack_env, store, landing_store, tmp_path, batch_id):
    # countries.zip listed first: it is within the limit, and must not be downloaded either
    manifest = land_sample(landing_store, tmp_path, batch_id, n_points=2_000,
                           edit=lambda m: {**m, "files": m["files"][::-1]})
    files = [DataFile.model_validate(f) for f in manifest["files"]]
    assert [f.path for f in files] == ["countries.zip", "points.fgb"]
    countries = store.size("landing-zone", f"{batch_id}/countries.zip")
    size = store.size("landing-zone", f"{batch_id}/points.fgb")
    assert size > countries
    into = tmp_path / "downloads"
    into.mkdir()
    with pytest.raises(InputDataError) as caught:
        download_landed(store, "landing-zone", f"{batch_id}/", files, into,
                        max_file_bytes=size - 1)
    assert str(caught.value).startswith(
        f"file 'points.fgb' is {size:,} bytes; the limit is {size - 1:,} bytes per landed file")
    assert list(into.iterdir()) == []  # nothing, not even countries.zip listed before it

    with DagsterInstance.ephemeral() as instance:
        request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
        request.run_config["ops"]["shard_batch"] = {"config": {"max_file_bytes": size - 1}}
        result = run_ingest(instance, request, raise_on_error=False)
    assert not result.success
    step, message = _failure(result)
    assert step == "shard_batch"
    assert f"file 'points.fgb' is {size:,} bytes; the limit is {size - 1:,} bytes" in message
    assert not store.exists("data-lake", completion_key(batch_id))


def _land_with_heavy_polygon(landing_store, tmp_path, batch_id: str, policy: str) -> None:
    """The sample batch plus a layer 'parcels' whose row 2 (1-based) has 2M vertices."""
    folder = tmp_path / batch_id
    manifest = write_sample_batch(folder, batch_id, n_points=2_000)
    angles = np.linspace(0, 2 * np.pi, HEAVY_VERTICES - 1, endpoint=False)
    ring = np.column_stack([10 + np.cos(angles), 50 + np.sin(angles)])
    heavy = shapely.Polygon(np.vstack([ring, ring[:1]]))
    assert shapely.get_num_coordinates(heavy) == HEAVY_VERTICES
    gpd.GeoDataFrame({"parcel": ["a", "heavy", "c"]},
                     geometry=[shapely.box(0, 40, 1, 41), heavy, shapely.box(2, 42, 3, 43)],
                     crs="EPSG:4326").to_parquet(folder / "parcels.parquet")
    manifest["files"].append({"path": "parcels.parquet", "layer": "parcels",
                              "format": "geoparquet"})
    manifest["recipes"] = {"parcels": [{"step": "make_valid", "policy": policy}]}
    manifest["max_reject_fraction"] = {"parcels": 0.5}  # 1 of its 3 rows is rejected
    (folder / MANIFEST_FILENAME).write_text(json.dumps(manifest))
    land_batch(landing_store, folder, batch_id)


def test_a_2m_vertex_polygon_is_rejected_with_its_row_and_workers_stay_under_their_request(
        stack_env, store, landing_store, tmp_path, batch_id):
    _land_with_heavy_polygon(landing_store, tmp_path, batch_id, "reject")
    with DagsterInstance.ephemeral() as instance:
        request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
        result = run_ingest(instance, request)
        transform = result.output_for_node("transform_chunks")
        [metadata] = [e.event_specific_data.metadata for e in result.all_events
                      if e.event_type_value == "STEP_OUTPUT"
                      and e.step_key == "transform_chunks"]
    assert result.success
    assert transform.rows == 2_000 + 177 + 2  # points, countries, the parcels kept
    [parts] = [[o.key for o in store.list("data-lake", dataset_prefix(
        rejects_dataset("parcels"), batch_id))]]
    rejects = pq.read_table(io.BytesIO(store.get_bytes("data-lake", parts[0])))
    assert rejects.column("_reject_step").to_pylist() == ["vertex_limit"]
    assert rejects.column("_reject_reason").to_pylist() == [
        f"file 'parcels.parquet' (layer 'parcels'), row 2: the geometry has "
        f"{HEAVY_VERTICES:,} vertices; the limit is 1,000,000"]
    assert json.loads(rejects.column("_attributes")[0].as_py()) == {"parcel": "heavy"}
    # every chunk task reported its worker's peak RSS: all below their memory requests
    ratio = metadata["peak_rss_of_memory_request"].value
    assert 0 < ratio < 1, (ratio, metadata["peak_worker_rss_mib"].value)


def test_a_2m_vertex_polygon_fails_the_run_under_policy_fail(stack_env, store, landing_store, tmp_path,
                                                              batch_id):
    _land_with_heavy_polygon(landing_store, tmp_path, batch_id, "fail")
    with DagsterInstance.ephemeral() as instance:
        request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
        result = run_ingest(instance, request, raise_on_error=False)
    assert not result.success
    step, message = _failure(result)
    assert step == "shard_batch"
    assert (f"file 'parcels.parquet' (layer 'parcels'), row 2: the geometry has "
            f"{HEAVY_VERTICES:,} vertices; the limit is 1,000,000 (recipe policy 'fail')"
            in message), message
    assert not store.exists("data-lake", completion_key(batch_id))


def test_a_chunk_task_past_its_time_limit_fails_the_run_naming_the_chunk(stack_env, store, landing_store,
                                                                         tmp_path, batch_id):
    land_sample(landing_store, tmp_path, batch_id, n_points=2_000)
    with DagsterInstance.ephemeral() as instance:
        request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
        request.run_config["ops"]["shard_batch"] = {"config": {"transform_early": False}}
        resources = {**build_resources(), "ray_cluster": RayResource(
            address=EnvVar("RAY_ADDRESS"), task_time_limit_seconds=0.001)}
        result = ingest_batch.execute_in_process(
            run_config=request.run_config, instance=instance, tags=request.tags,
            resources=resources, raise_on_error=False)
    assert not result.success
    step, message = _failure(result)
    assert step == "transform_chunks"
    assert f"task transform:{batch_id}:" in message
    assert "ran longer than its time limit of 0.001 s and was cancelled" in message


OOM_DRIVER = textwrap.dedent("""
    from dagster import build_init_resource_context
    from etl_pipelines.ray.submit import TaskSpec, run_bounded
    from etl_pipelines.resources import RayResource

    def hog():
        block = bytearray(200 * 2**20)  # the monitor's threshold is far below the node's use
        import time
        time.sleep(60)
        return len(block)

    resource = RayResource(address="local", local_num_cpus=1, prestart_workers=False,
                           task_oom_retries=2)
    resource.setup_for_execution(build_init_resource_context())
    try:
        run_bounded(hog, [TaskSpec(name="transform:oom:layer:00007", args=())],
                    max_in_flight=1, max_retries=3, on_done=lambda *a: None)
    except Exception as exc:
        print("FAILED:", type(exc).__name__, str(exc).splitlines()[0])
    finally:
        resource.teardown_after_execution(build_init_resource_context())
""")


def test_an_oom_killed_task_is_retried_a_bounded_number_of_times_then_fails_naming_it(
        stack_env, tmp_path):
    # a private one-CPU cluster whose memory monitor kills any task: Ray's own default would
    # retry it for ever; RayResource bounds the retries at task_oom_retries
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_task_oom_retries")}
    env.update(RAY_memory_usage_threshold="0.01", RAY_memory_monitor_refresh_ms="100")
    done = subprocess.run([sys.executable, "-c", OOM_DRIVER], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert "There are 2 oom retries remaining" in output, output[-3000:]
    assert "There are 1 oom retries remaining" in output
    assert ("FAILED: TaskLimitError task transform:oom:layer:00007 was killed for lack of "
            "memory and retried until its OOM retries (RAY_task_oom_retries) ran out") in output
