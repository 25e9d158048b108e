"""A worker node killed mid-transform: its tasks are retried on the surviving node, the run
succeeds, and the lake holds exactly what a clean run on the same cluster published, nothing
lost and nothing twice."""

import logging
import signal
import threading
import time
import uuid

import pytest
from dagster import DagsterInstance
from geopandas.testing import assert_geodataframe_equal

from devstack import procs, ray_nodes
from devstack.ray_layout import RayHead
from tests.integration.ray_test_cluster import (
    lake_dataset,
    land_and_run,
    output_metadata,
    ray_address,
    transform_tasks,
    two_node_cluster,
)

pytestmark = pytest.mark.integration
# Chunks big enough (~0.1-0.3 s of work each) that a chunk is caught running on the worker
# node: 2,500-row point chunks take a few ms since the vectorised point paths, and under the
# default recipe a 40k-point chunk takes the coordinate-array path (~15 ms of CPU), so the
# points also get a derived centroid column, which keeps them on the general (GEOS) path.
N_POINTS = 240_000
CHUNK_ROWS = 40_000


def _slow_recipe(manifest: dict) -> dict:
    manifest["recipes"] = {"points": [{"step": "reproject"}, {"step": "make_valid"},
                                      {"step": "derive", "column": "cx", "kind": "centroid_x"}]}
    return manifest
log = logging.getLogger(__name__)


def _running_in(pids: set[int], batch_id: str) -> set[str]:
    """Task names running right now in ``pids`` (Ray titles a busy worker process
    ``ray::<task name>``): one read of /proc/<pid>/cmdline each, well under a millisecond."""
    prefix = f"ray::transform:{batch_id}:"
    titles = (" ".join(procs.cmdline(pid)) for pid in pids)
    return {t.removeprefix("ray::") for t in titles if t.startswith(prefix)}


class WorkerKiller(threading.Thread):
    """Once a transform chunk of ``batch_id`` has finished and another one is running on the
    worker node, SIGKILL the worker node's whole process tree (raylet, object store, task
    worker processes, agents): a node lost mid-transform.

    Watches process titles (``/proc/<pid>/cmdline`` of both nodes' processes, every half
    millisecond) rather than Ray's state API (a call takes 100 ms or more; a chunk of the
    test's size takes tens of ms): a chunk seen running and then no longer running anywhere
    has finished."""

    def __init__(self, head: RayHead, batch_id: str, timeout: float = 120.0) -> None:
        super().__init__(daemon=True)
        self.head, self.batch_id, self.timeout = head, batch_id, timeout
        self.killed: dict | None = None

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        head_pid = ray_nodes.running_pid(self.head)
        worker_pid = ray_nodes.running_workers(self.head)[1]
        seen: set[str] = set()
        refreshed = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() - refreshed > 0.05:  # new worker processes appear rarely
                head_tree = procs.process_tree(head_pid) if head_pid else set()
                worker_tree = procs.process_tree(worker_pid)
                refreshed = time.monotonic()
            on_head = _running_in(head_tree, self.batch_id)
            on_worker = _running_in(worker_tree, self.batch_id)
            finished = seen - on_head - on_worker
            seen |= on_head | on_worker
            if finished and on_worker:
                tree = procs.process_tree(worker_pid)
                procs.send_signal(tree, signal.SIGKILL)
                self.killed = {"finished_before": len(finished), "interrupted": sorted(on_worker),
                               "processes": len(tree)}
                return
            time.sleep(0.0005)


@pytest.fixture(scope="module")
def cluster(stack_env, tmp_path_factory):
    with two_node_cluster(tmp_path_factory.mktemp("ray-worker-death")) as head:
        yield head


@pytest.fixture(scope="module")
def runs(stack_env, landing_store, cluster, tmp_path_factory):
    """A clean run, then the same data again with the worker node killed mid-transform."""
    tmp = tmp_path_factory.mktemp("worker-death-batches")
    suffix = uuid.uuid4().hex[:8]
    batches = {"clean": f"clean-{suffix}", "killed": f"killed-{suffix}"}
    results = {}
    with DagsterInstance.ephemeral() as instance, \
            ray_address(cluster.address, cluster.dashboard_url):
        results["clean"] = land_and_run(landing_store, tmp, batches["clean"], instance,
                                        n_points=N_POINTS, chunk_rows=CHUNK_ROWS,
                                        edit=_slow_recipe)
        killer = WorkerKiller(cluster, batches["killed"])
        killer.start()
        started = time.monotonic()
        results["killed"] = land_and_run(landing_store, tmp, batches["killed"], instance,
                                         n_points=N_POINTS, chunk_rows=CHUNK_ROWS,
                                         edit=_slow_recipe, raise_on_error=False)
        seconds = time.monotonic() - started
        killer.join(timeout=5)
    log.info("run with the worker killed: %.1fs; %s", seconds, killer.killed)
    return {"batches": batches, "results": results, "killed": killer.killed}


def test_the_worker_node_died_mid_transform_and_tasks_were_retried(cluster, runs):
    assert runs["killed"] is not None, "the worker node was never caught running a chunk"
    assert runs["killed"]["finished_before"] >= 1 and runs["killed"]["interrupted"]
    assert ray_nodes.running_workers(cluster) == {}
    result = runs["results"]["killed"]
    assert result.success, result.get_step_failure_events()
    metadata = output_metadata(result, "transform_chunks")
    tasks = transform_tasks(cluster, metadata["ray_job_id"], runs["batches"]["killed"])
    finished = [t for t in tasks if t["state"] == "FINISHED"]
    assert len(finished) == metadata["chunks"] == len({t["name"] for t in finished})
    interrupted = set(runs["killed"]["interrupted"])
    retried = [t for t in finished if t["name"] in interrupted]
    assert retried and all(t["attempt_number"] >= 1 for t in retried), retried
    # every retry ran on the head, the only node left
    heads = [n["node_id"] for n in ray_nodes.alive_nodes(cluster) if n["is_head_node"]]
    assert {t["node_id"] for t in retried} == set(heads)


def test_counts_equal_the_clean_run(runs):
    clean = output_metadata(runs["results"]["clean"], "transform_chunks")
    killed = output_metadata(runs["results"]["killed"], "transform_chunks")
    for key in ("rows_in", "rows_out", "rows_rejected", "chunks"):
        assert killed[key] == clean[key], key
    assert output_metadata(runs["results"]["killed"], "load_and_join")["loaded_rows"] == \
        output_metadata(runs["results"]["clean"], "load_and_join")["loaded_rows"]


@pytest.mark.parametrize("dataset, key", [("points", "point_id"), ("countries", "name"),
                                          ("points_per_country", "name")])
def test_lake_equals_the_clean_run_without_duplicates(store, runs, dataset, key):
    killed = lake_dataset(store, runs["batches"]["killed"], dataset, key)
    clean = lake_dataset(store, runs["batches"]["clean"], dataset, key)
    assert killed[key].is_unique
    if dataset == "points":
        assert len(killed) == N_POINTS
    assert_geodataframe_equal(killed, clean)
