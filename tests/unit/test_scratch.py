"""Housekeeping offline: the run's local scratch (locked while its process lives, removed by the
janitor once the process is killed), the free-space check made before a batch is downloaded
into it, and which staging folders and lake keys the staging janitor recognises."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
from dagster import DagsterInstance, build_sensor_context

from etl_pipelines.resources import ScratchResource
from etl_pipelines.sensors.janitor import scratch_janitor
from libs.errors import ScratchSpaceError
from libs.lake import folders_of
from libs.lake.housekeeping import PART_KEY
from libs.sharding import check_scratch_space, remove_dead_scratch, run_scratch
from libs.sharding.scratch import scratch_bytes_needed

HOLD_SCRATCH = """
import sys, time
from pathlib import Path
from libs.sharding.scratch import run_scratch
with run_scratch(Path(sys.argv[1]), sys.argv[2]) as directory:
    (directory / "landed").mkdir()
    (directory / "landed" / "points.fgb").write_bytes(b"x" * 1000)
    print("ready", flush=True)
    time.sleep(600)
"""


def _hold_scratch(root, run_ids) -> list[subprocess.Popen]:
    """One process per run id holding its scratch (started together: each imports pyarrow)."""
    processes = [subprocess.Popen([sys.executable, "-c", HOLD_SCRATCH, str(root), run_id],
                                  stdout=subprocess.PIPE, text=True) for run_id in run_ids]
    for process in processes:
        assert process.stdout.readline().strip() == "ready"
    return processes


def _janitor_tick(root):
    with DagsterInstance.ephemeral() as instance, build_sensor_context(
            instance=instance,
            resources={"scratch": ScratchResource(directory=str(root), grace_seconds=0)}
    ) as context:
        return scratch_janitor(context)


def test_the_janitor_removes_a_killed_runs_scratch_and_keeps_a_live_ones(tmp_path):
    killed, live = "0c1d3a2e-aaaa-4bbb-8ccc-000000000001", "0c1d3a2e-aaaa-4bbb-8ccc-000000000002"
    processes = _hold_scratch(tmp_path, [killed, live])
    (tmp_path / "not-a-run.txt").write_text("left alone: not a run directory")
    try:
        os.kill(processes[0].pid, signal.SIGKILL)  # no finally, no atexit: the scratch stays
        processes[0].wait()
        assert (tmp_path / killed / "landed" / "points.fgb").exists()
        reason = _janitor_tick(tmp_path)
        assert f"removed 1 dead run scratch dir(s) under {tmp_path}" == reason.skip_message
        assert not (tmp_path / killed).exists()
        assert (tmp_path / live / "landed" / "points.fgb").exists(), "a live run's scratch"
        assert (tmp_path / "not-a-run.txt").exists()
    finally:
        processes[1].kill()
        processes[1].wait()
    assert _janitor_tick(tmp_path).skip_message.startswith("removed 1 dead run scratch")


def test_a_young_directory_is_left_alone_whatever_its_lock(tmp_path):
    (tmp_path / "0c1d3a2e-aaaa-4bbb-8ccc-000000000003").mkdir()  # created, not yet locked
    assert remove_dead_scratch(tmp_path, grace_seconds=60) == []
    assert remove_dead_scratch(tmp_path, grace_seconds=0) == [
        "0c1d3a2e-aaaa-4bbb-8ccc-000000000003"]


def test_a_run_removes_its_own_scratch_when_it_ends_and_refuses_odd_run_ids(tmp_path):
    with run_scratch(tmp_path, "0c1d3a2e-aaaa-4bbb-8ccc-000000000004") as directory:
        (directory / "spill.arrow").write_bytes(b"x")
        assert remove_dead_scratch(tmp_path, grace_seconds=0) == []  # locked by this process
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="is not a run id"):
        with run_scratch(tmp_path, "../etc"):
            pass


def test_free_space_check_names_the_batch_the_bytes_and_the_directory(tmp_path):
    files = [("flatgeobuf", 1000), ("geoparquet", 100)]
    assert scratch_bytes_needed(files, factor=3, compressed_factor=8) == 3800
    assert check_scratch_space(tmp_path, files, factor=3, compressed_factor=8, reserve_bytes=0,
                               batch_id="b") > 0
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(ScratchSpaceError) as raised:
        check_scratch_space(tmp_path, files, factor=3, compressed_factor=8,
                            reserve_bytes=free + 2**30, batch_id="parcels-2026-12")
    message = str(raised.value)
    assert "batch 'parcels-2026-12': its landed files total 1,100 bytes" in message
    assert f"needs about {3800 + free + 2**30:,} bytes of local scratch (3 x the files, 8 x " \
           "those in a compressed format (geoparquet, shapefile_zip)" in message
    assert f"but {tmp_path} has " in message and "Nothing was downloaded" in message


def test_the_folders_an_emptied_run_leaves_are_named_deepest_first_and_only_below_the_run():
    assert folders_of(["runs/r1/chunks/points/chunk-00000.parquet",
                       "runs/r1/results/j/part-00000.parquet", "runs/r1/x.json"]) == [
        "runs/r1/chunks/points/", "runs/r1/results/j/", "runs/r1/chunks/", "runs/r1/results/",
        "runs/r1/"]


def test_only_a_publication_part_key_is_a_lake_part():
    run = "0c1d3a2e-aaaa-4bbb-8ccc-000000000001"
    assert PART_KEY.match(f"points/b1/{run}.0a1b2c3d/part-00000.parquet")["run_id"] == run
    for key in (f"points/b1/{run}/part-00000.parquet",  # no publication suffix
                f"points/b1/{run}.0a1b2c3d/notes.txt", "_batches/b1.json",
                f"points/b1/{run}.0a1b2c3d/sub/part-00000.parquet"):
        assert PART_KEY.match(key) is None, key
