"""The pipeline's Ray application metrics, scraped from the nodes' Prometheus endpoints after a
run on the two-node test cluster: the shard and transform stages' spatial_etl_* series carry
the run's batch_id, and the feature counts equal the row counts the run recorded (load, join
and publish run after the run has left Ray: progress lines only)."""

import json
import logging
import re
import time
import urllib.request
import uuid
from collections import defaultdict

import pytest

from etl_pipelines.ray import metrics as ray_metrics
from libs.lake import completion_key
from tests.integration.ray_test_cluster import run_in_own_process, two_node_cluster

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

# Ray's export can lag the recording (each process reports to its node's agent every few s)
SCRAPE_TIMEOUT = 60.0
SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>.*)\}\s+(?P<value>\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url: str, batch_id: str) -> dict[tuple[str, str, str], float]:
    """``{(prometheus name, stage, layer): value summed over processes}`` for ``batch_id``."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    totals: dict[tuple[str, str, str], float] = defaultdict(float)
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if not match or not match["name"].startswith("ray_spatial_etl_"):
            continue
        labels = dict(LABEL.findall(match["labels"]))
        if labels.get("batch_id") == batch_id:
            totals[(match["name"], labels["stage"], labels["layer"])] += float(match["value"])
    return dict(totals)


@pytest.fixture(scope="module")
def cluster(stack_env, tmp_path_factory):
    with two_node_cluster(tmp_path_factory.mktemp("ray-metrics")) as head:
        yield head


@pytest.fixture(scope="module")
def run(stack_env, store, cluster, tmp_path_factory):
    batch_id = f"metrics-{uuid.uuid4().hex[:10]}"
    # its own process: see run_in_own_process for the Ray bug this avoids
    summary = run_in_own_process(batch_id, tmp_path_factory.mktemp("metrics-batch"),
                                 cluster.address, cluster.dashboard_url)
    assert summary["success"]
    completion = json.loads(store.get_bytes("data-lake", completion_key(batch_id)))
    return {"batch_id": batch_id, **summary, "completion": completion}


#: Stages that export Ray metrics: the run disconnects from Ray after the transform, so load,
#: join and publish report through their progress lines and metadata only (docs/ray-metrics.md)
RAY_STAGES = ("shard", "transform")


def _expected_features(run) -> dict[tuple[str, str], int]:
    expected = {}
    for layer, rows in run["metadata"]["shard_batch"]["rows_per_layer"].items():
        expected[("shard", layer)] = rows
        expected[("transform", layer)] = rows  # features in = rows sharded
    return expected


def test_the_ray_stages_export_feature_counts_equal_to_the_row_counts(cluster, run):
    features = ray_metrics.prometheus_name(ray_metrics.FEATURES)
    assert features == "ray_spatial_etl_features_total"
    expected = _expected_features(run)
    assert all(expected.values())
    urls = [cluster.metrics_url, cluster.worker(1).metrics_url]
    started = time.monotonic()
    while True:
        per_node = [scrape(url, run["batch_id"]) for url in urls]
        observed: dict[tuple[str, str], float] = defaultdict(float)
        for node in per_node:
            for (name, stage, layer), value in node.items():
                if name == features:
                    observed[(stage, layer)] += value
        if observed == expected or time.monotonic() - started > SCRAPE_TIMEOUT:
            break
        time.sleep(1)
    log.info("metrics complete after %.1fs: %s", time.monotonic() - started, dict(observed))
    assert dict(observed) == expected
    # each series is exported by the node whose processes recorded it: the shard by the
    # driver's (the head), the transform by the nodes its tasks ran on. Which nodes those are
    # is SPREAD's choice, checked by test_ray_multinode: once a loaded CI machine ran every
    # chunk on the head, so the worker's endpoint holds transform series or none
    assert any(stage == "transform" for (_, stage, _) in per_node[0] | per_node[1]), per_node
    assert {stage for (_, stage, _) in per_node[1]} <= {"transform"}, per_node
    run["scraped"] = per_node


def test_bytes_and_chunks_are_exported_for_the_ray_stages(run):
    per_node = run.get("scraped")
    if per_node is None:
        pytest.skip("the feature counts never completed (see the test above)")
    totals: dict[tuple[str, str], float] = defaultdict(float)
    for node in per_node:
        for (name, stage, _), value in node.items():
            totals[(name, stage)] += value
    assert {stage for (_, stage) in totals} == set(RAY_STAGES), totals
    for stage in RAY_STAGES:
        assert totals[(ray_metrics.prometheus_name(ray_metrics.BYTES), stage)] > 0, stage
        assert totals[(ray_metrics.prometheus_name(ray_metrics.CHUNKS), stage)] > 0, stage
    chunks = run["metadata"]["transform_chunks"]["chunks"]
    assert totals[(ray_metrics.prometheus_name(ray_metrics.CHUNKS), "transform")] == chunks
    assert totals[(ray_metrics.prometheus_name(ray_metrics.CHUNKS), "shard")] == chunks
    # the sample batch has no recipe that rejects anything: no reject series at all
    assert not any(name == ray_metrics.prometheus_name(ray_metrics.REJECTS)
                   for (name, _) in totals)


def test_each_stage_logs_one_shape_of_progress_line_up_to_its_total(run):
    shape = re.compile(r"^(?P<stage>shard|transform|load|publish) (?P<done>\d+)/(?P<total>\d+|\?) "
                       r"chunks, (?P<rows>[\d,]+) rows, [\d,]+ features/s")
    lines: dict[str, list[re.Match]] = defaultdict(list)
    for message in run["messages"]:
        if match := shape.match(message):
            lines[match["stage"]].append(match)
    assert set(lines) == {"shard", "transform", "load", "publish"}
    chunks = run["metadata"]["transform_chunks"]["chunks"]
    rows = run["metadata"]["shard_batch"]["rows"]
    for stage in ("shard", "transform", "load"):
        done = [int(m["done"]) for m in lines[stage]]
        assert done[-1] == chunks and done == sorted(done), (stage, done)
        assert lines[stage][-1]["total"] == str(chunks)
        assert int(lines[stage][-1]["rows"].replace(",", "")) == rows
    # one line per chunk as it finishes (shard also ends with the total, once known)
    assert len(lines["transform"]) == len(lines["load"]) == chunks
    assert len(lines["shard"]) == chunks + 1
    published = sum(len(d["objects"]) for d in run["completion"]["datasets"].values())
    assert lines["publish"][-1]["done"] == lines["publish"][-1]["total"] == str(published)
