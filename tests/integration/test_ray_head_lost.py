"""The Ray head lost, on a private one-node cluster (never the stack's head): killed
mid-transform, the run (a Ray Client driver, as from outside the cluster) fails naming the lost
cluster and a re-execution on the restarted head publishes; killed right after the transform,
the run (no longer connected to Ray) still loads, joins and publishes.

A driver attached to a node's raylet (RAY_ADDRESS host:port) does not fail: its process exits
with the head (Ray's own behaviour), and run monitoring fails the run (docs/run-lifecycle.md)."""

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
from dagster import (
    DagsterEventType,
    DagsterInstance,
    ReexecutionOptions,
    execute_job,
    instance_for_test,
    reconstructable,
)

from devstack.procs import process_tree, send_signal
from devstack.ray_layout import RayHead
from devstack.ray_nodes import running_cluster, running_pid, start, wait_until_ready
from etl_pipelines.ray.metrics import connected_to_ray
from libs.lake import completion_key
from tests.integration.pipeline import land_sample, request_for, run_ingest, sensor_tick
from tests.integration.ray_test_cluster import ray_address
from tests.integration.reexecutable import ingest_batch_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]
#: A port block of its own (26779..26878), apart from ray_test_cluster's (26479..26578)
GCS_PORT = 26779


@pytest.fixture(scope="module")
def head(stack_env, tmp_path_factory):
    cluster = RayHead.port_block(tmp_path_factory.mktemp("ray-head-lost"), GCS_PORT,
                                 num_cpus=2)
    with running_cluster(cluster, 0) as running:
        yield running


def kill_head(head: RayHead) -> None:
    """SIGKILL the head and every process it started (GCS, raylet, workers): a lost host."""
    pid = running_pid(head)
    assert pid is not None, "the head is not running"
    send_signal(process_tree(pid), signal.SIGKILL)


class KillAfterStep(threading.Thread):
    """Kills the head once ``step`` of the instance's (only) run has ``event`` (polled)."""

    def __init__(self, instance: DagsterInstance, head: RayHead, step: str,
                 event: DagsterEventType):
        super().__init__(daemon=True)
        self.instance, self.head, self.step, self.event = instance, head, step, event
        self.killed_at: float | None = None
        #: whether this process (the run's, in-process) was connected to Ray at the kill
        self.connected_at_kill: bool | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for run in self.instance.get_runs():
                if any(e.step_key == self.step for e in self.instance.all_logs(
                        run.run_id, of_type=self.event)):
                    self.connected_at_kill = connected_to_ray()
                    kill_head(self.head)
                    self.killed_at = time.monotonic()
                    return
            time.sleep(0.05)


def wait_for_ray_client(address: str, timeout: float = 90.0) -> None:
    """Until a Ray Client session to ``address`` starts (a restarted head's client server
    refuses sessions for a while after the head is ready), each try in its own process."""
    deadline = time.monotonic() + timeout
    probe = f"import ray; ray.init({address!r}); ray.shutdown()"
    while True:
        try:
            done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                  timeout=30, check=False)
            if done.returncode == 0:
                return
            problem = done.stderr[-500:]
        except subprocess.TimeoutExpired:
            problem = "timed out"
        assert time.monotonic() < deadline, f"no Ray Client session at {address}: {problem}"
        time.sleep(1)


def _request(instance, batch_id: str, chunk_rows: int):
    request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
    config = json.loads(json.dumps(request.run_config))
    config["ops"]["shard_batch"] = {"config": {"chunk_rows": chunk_rows}}
    return request.with_replaced_attrs(run_config=config)


def test_the_head_killed_mid_transform_fails_the_run_and_reexecution_publishes(
        head, store, landing_store, tmp_path, batch_id, monkeypatch):
    land_sample(landing_store, tmp_path, batch_id, n_points=100_000)
    monkeypatch.setenv("RAY_CLIENT_RECONNECT_GRACE_PERIOD", "5")
    client = f"ray://{head.host}:{head.client_server_port}"
    wait_for_ray_client(client)  # a fresh head's client server refuses sessions for a while
    with ray_address(client, head.dashboard_url), instance_for_test() as instance:
        request = _request(instance, batch_id, 5_000)
        killer = KillAfterStep(instance, head, "transform_chunks", DagsterEventType.STEP_START)
        killer.start()
        try:
            failed = execute_job(reconstructable(ingest_batch_job), instance,
                                 run_config=request.run_config, tags=request.tags)
        finally:
            killer.stop.set()
            killer.join(timeout=30)
        assert killer.killed_at is not None, "the transform never started"
        assert not failed.success
        failure = next(e for e in failed.all_events if e.event_type_value == "STEP_FAILURE")
        assert failure.step_key == "transform_chunks"
        raised = failure.step_failure_data.error.cause  # what the op raised, under Dagster's
        assert raised.cls_name == "RayClusterLost", raised.to_string()
        assert "lost the Ray cluster" in raised.message and "re-execute" in raised.message
        assert not store.exists("data-lake", completion_key(batch_id))
        start(head)
        wait_until_ready(head)
        wait_for_ray_client(client)
        again = execute_job(reconstructable(ingest_batch_job), instance,
                            reexecution_options=ReexecutionOptions.from_failure(
                                failed.run_id, instance))
        assert again.success
    manifest = json.loads(store.get_bytes("data-lake", completion_key(batch_id)))
    assert manifest["datasets"]["points"]["rows"] == 100_000


def test_the_head_killed_right_after_the_transform_does_not_stop_load_join_and_publish(
        head, store, landing_store, tmp_path, batch_id):
    land_sample(landing_store, tmp_path, batch_id, n_points=100_000)
    with ray_address(head.address, head.dashboard_url), DagsterInstance.ephemeral() as instance:
        request = _request(instance, batch_id, 10_000)
        killer = KillAfterStep(instance, head, "transform_chunks", DagsterEventType.STEP_SUCCESS)
        killer.start()
        try:
            result = run_ingest(instance, request, raise_on_error=False)
        finally:
            killer.stop.set()
            killer.join(timeout=30)
        assert killer.killed_at is not None, "the transform never finished"
        assert running_pid(head) is None, "the head survived"
        assert killer.connected_at_kill is False, "the run was still connected to Ray"
        assert result.success, "load, join or publish failed once the head was gone"
        messages = [e.user_message for e in instance.all_logs(result.run_id)]
        assert any(m.startswith("disconnected from Ray") for m in messages)
    manifest = json.loads(store.get_bytes("data-lake", completion_key(batch_id)))
    assert manifest["datasets"]["points"]["rows"] == 100_000
