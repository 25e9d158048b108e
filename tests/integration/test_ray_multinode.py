"""The pipeline on a multi-node Ray cluster on one machine: a head (1 CPU) and a separate worker
node process (1 CPU, its own raylet). Transform tasks land on both nodes, and the lake ends up
exactly as after a run on the stack's single-node Ray. Also: ray_cluster/ray_nodes.py's start and
scaling are idempotent on real processes."""

import logging
import time
import uuid

import pytest
from dagster import DagsterInstance
from geopandas.testing import assert_geodataframe_equal

from devstack import procs, ray_nodes
from tests.integration.ray_test_cluster import (
    N_POINTS,
    lake_dataset,
    land_and_run,
    output_metadata,
    ray_address,
    transform_tasks,
    two_node_cluster,
)

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)
#: Enough chunks (61) that the transform stage outlasts a cold worker start on the worker node:
#: each node's first worker holds its one CPU while it imports the task's modules (1-3 s,
#: more on a loaded machine), and with 21 chunks the head alone sometimes finished them all first.
N_POINTS_MULTI = 3 * N_POINTS


@pytest.fixture(scope="module")
def cluster(stack_env, tmp_path_factory):
    with two_node_cluster(tmp_path_factory.mktemp("ray-multinode")) as head:
        yield head


@pytest.fixture(scope="module")
def runs(stack_env, landing_store, cluster, tmp_path_factory):
    """The same landed data run twice: on the two-node cluster and on the stack's Ray."""
    tmp = tmp_path_factory.mktemp("multinode-batches")
    suffix = uuid.uuid4().hex[:8]
    batches = {"multi": f"multinode-{suffix}", "stack": f"stacknode-{suffix}"}
    results, seconds = {}, {}
    with DagsterInstance.ephemeral() as instance:
        started = time.monotonic()
        with ray_address(cluster.address, cluster.dashboard_url):
            results["multi"] = land_and_run(landing_store, tmp, batches["multi"], instance,
                                            n_points=N_POINTS_MULTI)
        seconds["multi"] = time.monotonic() - started
        started = time.monotonic()
        with ray_address(stack_env["RAY_ADDRESS"], stack_env["RAY_DASHBOARD_URL"]):
            results["stack"] = land_and_run(landing_store, tmp, batches["stack"], instance,
                                            n_points=N_POINTS_MULTI)
        seconds["stack"] = time.monotonic() - started
    log.info("run on the two-node cluster %.1fs, on the stack's Ray %.1fs", seconds["multi"],
             seconds["stack"])
    return {"batches": batches, "results": results}


def test_transform_tasks_ran_on_both_nodes(cluster, runs):
    result = runs["results"]["multi"]
    assert result.success
    metadata = output_metadata(result, "transform_chunks")
    assert metadata["ray_dashboard"] == cluster.dashboard_url
    nodes = {n["node_id"]: n["is_head_node"] for n in ray_nodes.alive_nodes(cluster)}
    assert sorted(nodes.values()) == [False, True]
    tasks = transform_tasks(cluster, metadata["ray_job_id"], runs["batches"]["multi"])
    finished = [t for t in tasks if t["state"] == "FINISHED"]
    # one finished attempt per chunk, named transform:<batch>:<layer>:<chunk>
    assert len(finished) == metadata["chunks"] == len({t["name"] for t in finished})
    per_node = {}
    for task in finished:
        per_node[task["node_id"]] = per_node.get(task["node_id"], 0) + 1
    log.info("transform tasks per node: %s",
             {("head" if nodes[n] else "worker"): c for n, c in per_node.items()})
    assert set(per_node) == set(nodes), "a node of the cluster ran no transform task"


@pytest.mark.parametrize("dataset, key", [("points", "point_id"), ("countries", "name"),
                                          ("points_per_country", "name")])
def test_lake_equals_the_run_on_the_stacks_ray(store, runs, dataset, key):
    assert runs["results"]["stack"].success
    multi = lake_dataset(store, runs["batches"]["multi"], dataset, key)
    single = lake_dataset(store, runs["batches"]["stack"], dataset, key)
    if dataset == "points":
        assert len(multi) == N_POINTS_MULTI
        assert multi["point_id"].is_unique
    assert_geodataframe_equal(multi, single)


def test_start_and_scale_are_idempotent(cluster):
    head_pid = ray_nodes.running_pid(cluster)
    workers = ray_nodes.running_workers(cluster)
    assert ray_nodes.start(cluster) == head_pid
    assert ray_nodes.scale_workers(cluster, 1) == workers
    assert len(ray_nodes.wait_for_nodes(cluster, 2)) == 2
    # one more worker joins as its own node, and scaling back stops exactly that one
    grown = ray_nodes.scale_workers(cluster, 2)
    assert grown[1] == workers[1] and grown[2] not in (head_pid, workers[1])
    ray_nodes.wait_for_nodes(cluster, 3)
    assert ray_nodes.scale_workers(cluster, 1) == workers
    assert not procs.alive({grown[2]})
    ray_nodes.wait_for_nodes(cluster, 2)
    assert ray_nodes.running_pid(cluster) == head_pid
