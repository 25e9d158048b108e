"""ray_cluster/ray_nodes.py: the port layout of a cluster's block and the command lines it runs
(no Ray is started here; starting, scaling and stopping real nodes is in
tests/integration/test_ray_multinode.py)."""

from pathlib import Path

import pytest

from devstack import ray_layout, ray_nodes
from devstack.ray_layout import RayHead


def _flag_ports(command: list[str]) -> dict[str, int]:
    ports = {}
    for arg in command:
        name, _, value = arg.partition("=")
        if name.endswith("-port") and value.isdigit():
            ports[name] = int(value)
    return ports


def _cluster_ports(head: RayHead) -> list[int]:
    ports = list(_flag_ports(head.command()).values())
    ports += [head.autoscaler_metric_port, head.dashboard_metric_port]
    for index in range(1, ray_layout.MAX_WORKERS + 1):
        ports += list(_flag_ports(head.worker(index).command()).values())
    return ports


def test_stack_head_keeps_its_ports_and_pins_the_rest():
    head = RayHead.in_state_root(Path("/tmp/state-root"))
    ports = _flag_ports(head.command())
    assert ports["--port"] == 56379
    assert ports["--dashboard-port"] == 8265
    assert ports["--ray-client-server-port"] == 56380
    assert ports["--dashboard-agent-listen-port"] == 56381
    assert (head.autoscaler_metric_port, head.dashboard_metric_port) == (56382, 56383)
    assert ports["--metrics-export-port"] == ray_layout.METRICS_EXPORT_PORT == 56384
    assert head.metrics_url == "http://127.0.0.1:56384/metrics"
    # every port a node opens is fixed: none left to Ray's defaults shared machine-wide
    assert {"--node-manager-port", "--object-manager-port", "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port"} <= set(ports)
    assert "--num-cpus=2" in head.command()
    assert "--block" in head.command()


@pytest.mark.parametrize("gcs_port", [ray_layout.GCS_PORT, 56479])
def test_every_port_of_a_cluster_is_distinct_and_inside_its_block(gcs_port):
    if gcs_port == ray_layout.GCS_PORT:
        head = RayHead.in_state_root(Path("/tmp/state-root"))
        ports = [p for p in _cluster_ports(head) if p != ray_layout.DASHBOARD_PORT]
    else:
        head = RayHead.port_block(Path("/tmp/test-cluster"), gcs_port)
        ports = _cluster_ports(head)
    assert len(ports) == len(set(ports)), "two listeners of one cluster share a port"
    assert all(gcs_port <= p < gcs_port + 100 for p in ports), sorted(ports)


def test_the_stack_and_a_test_cluster_never_share_a_port_or_a_temp_dir():
    stack = RayHead.in_state_root(Path("/tmp/state-root"))
    test = RayHead.port_block(Path("/tmp/test-cluster"), 56479, num_cpus=1)
    assert not set(_cluster_ports(stack)) & set(_cluster_ports(test))
    assert stack.temp_dir != test.temp_dir
    assert test.dashboard_url == "http://127.0.0.1:56569"
    assert "--num-cpus=1" in test.command()


def test_worker_joins_the_head_on_loopback_with_its_own_ports_and_the_heads_temp_dir():
    head = RayHead.port_block(Path("/tmp/test-cluster"), 56479, worker_num_cpus=1,
                                    worker_object_store_bytes=300 << 20)
    worker = head.worker(2)
    command = worker.command()
    start = command.index("start")
    assert command[:start] == [command[0], "-c", ray_layout.WORKER_LAUNCHER]
    assert "--head" not in command
    assert "--address=127.0.0.1:56479" in command
    assert "--node-ip-address=127.0.0.1" in command
    assert f"--temp-dir={head.temp_dir}" in command
    assert "--num-cpus=1" in command
    assert f"--object-store-memory={300 << 20}" in command
    assert _flag_ports(command) == {
        "--node-manager-port": 56499, "--object-manager-port": 56500,
        "--metrics-export-port": 56501, "--dashboard-agent-listen-port": 56502,
        "--dashboard-agent-grpc-port": 56503, "--runtime-env-agent-port": 56504}
    assert worker.metrics_url == "http://127.0.0.1:56501/metrics"
    assert worker.pid_file == head.pid_file.with_name("ray-worker-2.pid")


def test_stack_worker_files_sit_next_to_the_heads():
    head = RayHead.in_state_root(Path("/tmp/state-root"))
    assert head.worker(1).pid_file == Path("/tmp/state-root/pids/ray-worker-1.pid")
    assert head.worker(1).log_path == Path("/tmp/state-root/logs/ray-worker-1.log")


@pytest.mark.parametrize("index", [0, ray_layout.MAX_WORKERS + 1])
def test_worker_index_outside_the_block_is_refused(index):
    head = RayHead.in_state_root(Path("/tmp/state-root"))
    with pytest.raises(ValueError, match="worker index"):
        head.worker(index)


def test_scaling_beyond_the_block_is_refused_before_anything_starts(tmp_path):
    head = RayHead.port_block(tmp_path, 56479)
    with pytest.raises(ValueError, match="workers must be"):
        ray_nodes.scale_workers(head, ray_layout.MAX_WORKERS + 1)
    assert ray_nodes.running_workers(head) == {}


def test_a_worker_is_not_started_without_its_head(tmp_path):
    head = RayHead.port_block(tmp_path, 56479)
    with pytest.raises(ray_nodes.RayHeadError, match="head .* is not running"):
        ray_nodes.start_worker(head.worker(1))
    assert not head.worker(1).pid_file.exists()


def test_a_stale_worker_pid_file_is_not_taken_for_a_running_worker(tmp_path):
    head = RayHead.port_block(tmp_path, 56479)
    worker = head.worker(1)
    worker.pid_file.parent.mkdir(parents=True, exist_ok=True)
    worker.pid_file.write_text("1\n")  # init: alive, but not our `ray start`
    assert ray_nodes.worker_pid(worker) is None
    assert not worker.pid_file.exists()
