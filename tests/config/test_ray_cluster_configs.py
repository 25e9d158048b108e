"""Offline checks of the Ray cluster configurations and their monitoring.

Covers what ray_cluster/ ships for the three places a cluster runs, and how they
stay consistent with each other and with the pinned Ray:

- docker-compose.yaml: Ray metrics on the compose network only, the optional
  `monitoring` profile (Prometheus, Grafana) on 127.0.0.1 only, token auth;
- ray_cluster/kuberay/: the RayCluster (structure of ray.io/v1), Secrets as
  templates only, the NetworkPolicy and the Dagster connection patch;
- ray_cluster/cluster-launcher.yaml: validated the way `ray up` does, against the
  installed Ray's ray-schema.json;
- ray_cluster/monitoring/: the Prometheus scrape config targets the Ray nodes, and
  every Grafana query names a metric that exists (ours, or one Ray's own
  dashboards use).

No service is needed, and no container engine (the compose file is checked against the
Compose Specification's schema). External tool, if present: `kubectl kustomize`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from devstack.envfile import read_env_file
from tests.config.test_compose_and_images import (
    COMPOSE_FILE,
    ENV_EXAMPLE,
    command_args,
    compose_schema_errors,
    env_example_without,
    environment_of,
    flag_value,
    load_compose,
    parse_size,
    published_ports,
)

REPO = Path(__file__).resolve().parents[2]
RAY_CLUSTER = REPO / "ray_cluster"
KUBERAY = RAY_CLUSTER / "kuberay"
RAY_CLUSTER_MANIFEST = KUBERAY / "ray-cluster.autoscaling.yaml"
KUSTOMIZATION = KUBERAY / "kustomization.yaml"
USER_CODE_PATCH = KUBERAY / "dagster-user-code.ray-client.patch.yaml"
NETWORK_POLICY = KUBERAY / "network-policy.yaml"
SECRET_TEMPLATES = (KUBERAY / "ray-auth-secret.template.yaml", KUBERAY / "data-stores-secret.template.yaml")
LAUNCHER = RAY_CLUSTER / "cluster-launcher.yaml"
MONITORING = RAY_CLUSTER / "monitoring"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
GRAFANA_DATASOURCES = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
GRAFANA_PROVIDERS = MONITORING / "grafana" / "provisioning" / "dashboards" / "spatial-etl.yaml"
GRAFANA_DASHBOARDS = MONITORING / "grafana" / "dashboards"

USER_CODE_IMAGE = "spatial-etl-user-code"
# Ray ports that must never be published to the host by compose: GCS, Ray Client,
# the node metrics endpoint, the dashboard's and the autoscaler's metrics, the agent.
RAY_PRIVATE_PORTS = {6379, 10001, 8080, 44217, 44227, 52365}
MONITORING_SERVICES = ("prometheus", "grafana")
# The application counters the transform tasks export (etl_pipelines). Ray prefixes
# application metrics with `ray_` and Prometheus counters end in `_total` (checked
# against Ray 2.60: a Counter "x" is exposed as ray_x_total).
APPLICATION_METRICS = {f"ray_spatial_etl_{name}_total" for name in ("features", "bytes", "rejects", "chunks")}


# ----------------------------------------------------------------------------- helpers


def pinned_ray_version() -> str:
    for raw in (REPO / "requirements-user-code.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and Requirement(line).name == "ray":
            (spec,) = Requirement(line).specifier
            assert spec.operator == "==", f"ray must be pinned exactly: {line}"
            return spec.version
    raise AssertionError("requirements-user-code.txt does not pin ray")


def image_name_and_tag(image: str) -> tuple[str, str]:
    repository, _, tag = image.rpartition(":")
    assert repository and "/" not in tag, f"image {image!r} has no explicit tag"
    return repository.rsplit("/", 1)[-1], tag


def compose_user_code_tag() -> str:
    """The user-code image tag compose uses when IMAGE_TAG is not set."""
    match = re.search(rf"image:\s*{USER_CODE_IMAGE}:\$\{{IMAGE_TAG:-([\w.-]+)\}}", COMPOSE_FILE.read_text())
    assert match, (
        f"docker-compose.yaml should tag the user-code image {USER_CODE_IMAGE}:${{IMAGE_TAG:-<tag>}}"
    )
    return match.group(1)


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def ray_cluster() -> dict[str, Any]:
    (cluster,) = [d for d in load_yaml_documents(RAY_CLUSTER_MANIFEST) if d["kind"] == "RayCluster"]
    return cluster


def pod_groups(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{'head': headGroupSpec, '<groupName>': workerGroupSpec, ...}"""
    spec = cluster["spec"]
    groups = {"head": spec["headGroupSpec"]}
    for group in spec["workerGroupSpecs"]:
        groups[group["groupName"]] = group
    return groups


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    # KubeRay treats the first container as the Ray container.
    return group["template"]["spec"]["containers"][0]


def all_env_entries(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every `env:` entry of every container anywhere in the documents."""
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "env" and isinstance(value, list):
                    found.extend(entry for entry in value if isinstance(entry, dict))
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(documents)
    return found


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return load_compose()["services"]


# ------------------------------------------------------------- docker-compose.yaml


def test_monitoring_services_follow_the_compose_specification(services: dict[str, Any]) -> None:
    # the whole file: test_compose_and_images.test_compose_file_follows_the_compose_specification
    for name in MONITORING_SERVICES:
        assert services[name].get("profiles") == ["monitoring"], name
    errors = compose_schema_errors({"services": {name: services[name] for name in MONITORING_SERVICES}})
    assert not errors, "\n".join(errors)


def test_compose_refuses_to_start_without_a_grafana_password() -> None:
    with pytest.raises(AssertionError, match="GRAFANA_ADMIN_PASSWORD"):
        load_compose(env_example_without("GRAFANA_ADMIN_PASSWORD"))


def test_no_ray_private_port_is_published(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for host_ip, published, target in published_ports(service):
            assert target not in RAY_PRIVATE_PORTS, (
                f"{name} publishes container port {target} on {host_ip or 'all interfaces'}:{published}: "
                "Ray's GCS, client and metrics ports stay on the compose network"
            )


@pytest.mark.parametrize(
    ("service_name", "container_port"),
    [("ray-head", 8265), ("prometheus", 9090), ("grafana", 3000)],
)
def test_web_uis_are_published_on_loopback_only(
    services: dict[str, Any], service_name: str, container_port: int
) -> None:
    ports = published_ports(services[service_name])
    assert [target for _, _, target in ports] == [container_port], ports
    ((host_ip, _, _),) = ports
    assert host_ip == "127.0.0.1", (
        f"{service_name}:{container_port} must be bound to 127.0.0.1, got {host_ip!r}"
    )


@pytest.mark.parametrize("service_name", ["ray-head", "ray-worker"])
def test_ray_nodes_export_metrics_on_the_compose_network(services: dict[str, Any], service_name: str) -> None:
    service = services[service_name]
    port = flag_value(command_args(service), "--metrics-export-port")
    assert port is not None, f"{service_name}: pass --metrics-export-port so Prometheus knows where to scrape"
    assert port in [str(p) for p in service.get("expose", [])], f"{service_name}: expose {port}"


def test_ray_token_auth_on_nodes_and_driver_only(services: dict[str, Any]) -> None:
    tokens = set()
    for name in ("ray-head", "ray-worker", "user_code"):
        env = environment_of(services[name])
        assert env.get("RAY_AUTH_MODE") == "token", f"{name}: RAY_AUTH_MODE must be token"
        assert env.get("RAY_AUTH_TOKEN"), f"{name}: RAY_AUTH_TOKEN is not set"
        tokens.add(env["RAY_AUTH_TOKEN"])
    assert len(tokens) == 1
    for name in MONITORING_SERVICES:
        assert "RAY_AUTH_TOKEN" not in environment_of(services[name]), f"{name} needs no Ray token"


@pytest.mark.parametrize("service_name", MONITORING_SERVICES)
def test_monitoring_services_are_optional_and_pinned(services: dict[str, Any], service_name: str) -> None:
    service = services[service_name]
    assert service.get("profiles") == ["monitoring"], f"{service_name} belongs to the monitoring profile only"
    _, tag = image_name_and_tag(service["image"])
    assert tag != "latest" and re.search(r"\d", tag), f"{service_name}: pin the image tag, got {tag!r}"


def test_grafana_admin_password_has_no_default() -> None:
    text = COMPOSE_FILE.read_text()
    assert re.search(r"GF_SECURITY_ADMIN_PASSWORD:\s*\$\{GRAFANA_ADMIN_PASSWORD:\?", text), (
        "Grafana's admin password must come from .env, required, with no default"
    )
    assert "change-me" in read_env_file(ENV_EXAMPLE)["GRAFANA_ADMIN_PASSWORD"]


def test_monitoring_files_are_mounted_where_their_configs_point(services: dict[str, Any]) -> None:
    prometheus_mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    assert prometheus_mounts["./ray_cluster/monitoring/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    grafana_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    provider = yaml.safe_load(GRAFANA_PROVIDERS.read_text())["providers"][0]
    assert grafana_mounts["./ray_cluster/monitoring/grafana/dashboards"] == provider["options"]["path"]
    assert grafana_mounts["./ray_cluster/monitoring/grafana/provisioning"] == "/etc/grafana/provisioning"
    for host_path in (*prometheus_mounts, *grafana_mounts):
        if host_path.startswith("./"):
            assert (REPO / host_path).exists(), f"compose mounts {host_path}, which does not exist"


# ---------------------------------------------------------------- image and version


def test_user_code_image_tag_is_the_same_everywhere() -> None:
    compose_tag = compose_user_code_tag()
    kustomize_images = yaml.safe_load(KUSTOMIZATION.read_text())["images"]
    (entry,) = [image for image in kustomize_images if image["name"] == USER_CODE_IMAGE]
    assert entry["newTag"] == compose_tag, (
        f"kustomization.yaml newTag {entry['newTag']} != compose {compose_tag}"
    )
    for name, group in pod_groups(ray_cluster()).items():
        image = ray_container(group)["image"]
        assert image_name_and_tag(image) == (USER_CODE_IMAGE, compose_tag), f"RayCluster {name}: {image}"
    launcher_image = yaml.safe_load(LAUNCHER.read_text())["docker"]["image"]
    assert image_name_and_tag(launcher_image) == (USER_CODE_IMAGE, compose_tag), launcher_image


def test_ray_version_equals_the_pin() -> None:
    assert ray_cluster()["spec"]["rayVersion"] == pinned_ray_version()


# ------------------------------------------------------------------------- KubeRay


def test_ray_cluster_required_structure() -> None:
    cluster = ray_cluster()
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["metadata"]["name"]
    spec = cluster["spec"]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["template"]["spec"]["containers"], "headGroupSpec.template.spec.containers is empty"
    assert spec["workerGroupSpecs"], "no worker group"
    for group in spec["workerGroupSpecs"]:
        for field in ("groupName", "minReplicas", "maxReplicas", "replicas", "rayStartParams", "template"):
            assert field in group, f"worker group lacks {field}"
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert group["maxReplicas"] > group["minReplicas"], "an autoscaling group needs room to grow"
        assert group["template"]["spec"]["containers"]
    # Every rayStartParams value is a string (KubeRay's map[string]string).
    for name, group in pod_groups(cluster).items():
        for key, value in group["rayStartParams"].items():
            assert isinstance(value, str), f"{name}.rayStartParams.{key} must be a string, got {value!r}"


def test_head_does_no_work_and_autoscaling_is_on() -> None:
    spec = ray_cluster()["spec"]
    params = spec["headGroupSpec"]["rayStartParams"]
    assert params["num-cpus"] == "0"
    assert params["dashboard-host"] == "0.0.0.0", "the dashboard must listen on the pod network"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", (
        "never expose the head service"
    )
    assert spec["enableInTreeAutoscaling"] is True


def test_named_ports() -> None:
    groups = pod_groups(ray_cluster())
    head_ports = {p["name"]: p["containerPort"] for p in ray_container(groups.pop("head"))["ports"]}
    assert {"gcs-server": 6379, "dashboard": 8265, "client": 10001}.items() <= head_ports.items(), head_ports
    assert "metrics" in head_ports
    for name, group in groups.items():
        worker_ports = {p["name"]: p["containerPort"] for p in ray_container(group)["ports"]}
        assert "metrics" in worker_ports, f"worker group {name} has no named metrics port"
        assert str(worker_ports["metrics"]) == group["rayStartParams"]["metrics-export-port"]
    assert (
        str(head_ports["metrics"])
        == ray_cluster()["spec"]["headGroupSpec"]["rayStartParams"]["metrics-export-port"]
    )


def test_every_container_has_requests_and_limits() -> None:
    cluster = ray_cluster()
    for name, group in pod_groups(cluster).items():
        for container in group["template"]["spec"]["containers"]:
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in resources.get(kind, {}), (
                        f"{name}/{container['name']}: {kind}.{resource}"
                    )
            assert resources["requests"]["memory"] == resources["limits"]["memory"], (
                f"{name}/{container['name']}: memory request must equal the limit (Ray reads the limit)"
            )
    autoscaler = cluster["spec"]["autoscalerOptions"]["resources"]
    assert {"cpu", "memory"} <= set(autoscaler["requests"]) and {"cpu", "memory"} <= set(autoscaler["limits"])


def test_dev_shm_is_in_memory_and_larger_than_the_object_store() -> None:
    for name, group in pod_groups(ray_cluster()).items():
        pod = group["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in ray_container(group).get("volumeMounts", [])}
        assert "/dev/shm" in mounts, f"{name}: mount an in-memory volume at /dev/shm"
        volume = {v["name"]: v for v in pod["volumes"]}[mounts["/dev/shm"]]
        assert volume["emptyDir"]["medium"] == "Memory", f"{name}: /dev/shm must be emptyDir medium Memory"
        store = int(group["rayStartParams"]["object-store-memory"])
        size = parse_size(volume["emptyDir"]["sizeLimit"].replace("i", ""))
        assert size > store, f"{name}: /dev/shm {size} <= object store {store}"


def test_token_auth_uses_one_secret_and_no_literal_token() -> None:
    spec = ray_cluster()["spec"]
    assert spec["authOptions"]["mode"] == "token"
    secret_name = spec["authOptions"]["secretName"]
    (auth_secret,) = load_yaml_documents(SECRET_TEMPLATES[0])
    assert auth_secret["metadata"]["name"] == secret_name
    assert "auth_token" in auth_secret["stringData"], "KubeRay reads the token from the key auth_token"
    patch_env = {e["name"]: e for e in all_env_entries(load_yaml_documents(USER_CODE_PATCH))}
    assert patch_env["RAY_AUTH_MODE"]["value"] == "token"
    assert patch_env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": secret_name,
        "key": "auth_token",
    }


@pytest.mark.parametrize(
    "path",
    [RAY_CLUSTER_MANIFEST, USER_CODE_PATCH, NETWORK_POLICY, KUBERAY / "pod-monitor.yaml"],
    ids=lambda p: p.name,
)
def test_no_secret_value_in_manifests(path: Path) -> None:
    for entry in all_env_entries(load_yaml_documents(path)):
        if re.search(r"TOKEN|PASSWORD|SECRET|CONNECTION_STRING", entry["name"]):
            assert "value" not in entry and "valueFrom" in entry, f"{path.name}: {entry['name']} is a literal"
    assert not [d for d in load_yaml_documents(path) if d.get("kind") == "Secret"], (
        f"{path.name} holds a Secret"
    )


@pytest.mark.parametrize("path", SECRET_TEMPLATES, ids=lambda p: p.name)
def test_secret_templates_hold_no_values_and_are_not_applied(path: Path) -> None:
    (secret,) = load_yaml_documents(path)
    assert secret["kind"] == "Secret" and "data" not in secret
    filled = {key: value for key, value in secret["stringData"].items() if value}
    assert not filled, f"{path.name} is a template: keep every value empty, found {sorted(filled)}"
    resources = yaml.safe_load(KUSTOMIZATION.read_text())["resources"]
    assert path.name not in resources, f"kustomization.yaml would overwrite the real Secret with {path.name}"


def test_data_store_secret_has_the_contract_keys() -> None:
    contract = ("MINIO_ENDPOINT", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "MONGO_CONNECTION_STRING")
    contract += ("POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_USER", "POSTGRES_PASSWORD")
    (secret,) = load_yaml_documents(SECRET_TEMPLATES[1])
    assert set(secret["stringData"]) == set(contract)
    for name, group in pod_groups(ray_cluster()).items():
        refs = [e["secretRef"]["name"] for e in ray_container(group).get("envFrom", []) if "secretRef" in e]
        assert secret["metadata"]["name"] in refs, f"{name} does not load the data-store Secret"


def test_dagster_connects_through_ray_client_on_the_head_service() -> None:
    cluster = ray_cluster()
    patch_env = {e["name"]: e for e in all_env_entries(load_yaml_documents(USER_CODE_PATCH))}
    address = patch_env["RAY_ADDRESS"]["value"]
    head_ports = {p["name"]: p["containerPort"] for p in ray_container(pod_groups(cluster)["head"])["ports"]}
    assert address == f"ray://{cluster['metadata']['name']}-head-svc:{head_ports['client']}", address
    assert patch_env["RAY_DASHBOARD_URL"]["value"].startswith("http://127.0.0.1:"), "linked from run metadata"


def test_compose_runs_link_the_published_dashboard(services: dict[str, Any]) -> None:
    env = environment_of(services["user_code"])
    ((host_ip, published, _),) = published_ports(services["ray-head"])
    assert env["RAY_DASHBOARD_URL"] == f"http://{host_ip}:{published}", "RayResource reads RAY_DASHBOARD_URL"


def test_network_policy_admits_the_dagster_pods_to_the_head_only() -> None:
    cluster_name = ray_cluster()["metadata"]["name"]
    (patch,) = load_yaml_documents(USER_CODE_PATCH)
    client_labels = patch["spec"]["template"]["metadata"]["labels"]
    policies = {p["metadata"]["name"]: p["spec"] for p in load_yaml_documents(NETWORK_POLICY)}
    for spec in policies.values():
        assert spec["podSelector"]["matchLabels"]["ray.io/cluster"] == cluster_name
    from_dagster = [
        spec
        for spec in policies.values()
        if any(
            peer.get("podSelector", {}).get("matchLabels") == client_labels
            for rule in spec["ingress"]
            for peer in rule["from"]
        )
    ]
    assert len(from_dagster) == 1, "exactly one policy should admit the Dagster pods"
    (spec,) = from_dagster
    assert spec["podSelector"]["matchLabels"].get("ray.io/node-type") == "head"
    ports = {port["port"] for rule in spec["ingress"] for port in rule["ports"]}
    assert ports == {10001, 8265, 6379}, ports


def test_kustomize_renders_the_cluster_with_the_compose_tag() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (optional: renders the kustomization offline)")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBERAY)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = sorted(doc["kind"] for doc in documents)
    assert kinds == ["NetworkPolicy", "NetworkPolicy", "NetworkPolicy", "RayCluster"], kinds
    (cluster,) = [doc for doc in documents if doc["kind"] == "RayCluster"]
    tag = compose_user_code_tag()
    for name, group in pod_groups(cluster).items():
        assert ray_container(group)["image"].endswith(f"{USER_CODE_IMAGE}:{tag}"), name


# -------------------------------------------------------------- cluster launcher


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    return yaml.safe_load(LAUNCHER.read_text())


def test_launcher_validates_against_rays_schema(launcher: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    autoscaler = pytest.importorskip("ray.autoscaler")
    schema = json.loads((Path(autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)
    # What `ray up` does before launching anything: fill in the provider's defaults
    # (for `local`: one node type sized by worker_ips), then validate again.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(launcher)
    validate_config(prepared)
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert node_type["max_workers"] == len(launcher["provider"]["worker_ips"])


def _start_args(commands: list[str]) -> list[str]:
    (start,) = [c for c in commands if "ray start" in c]
    return start.split()


def test_launcher_head_command(launcher: dict[str, Any]) -> None:
    args = _start_args(launcher["head_start_ray_commands"])
    assert "--head" in args
    assert flag_value(args, "--num-cpus") == "0"
    assert flag_value(args, "--dashboard-host") == launcher["provider"]["head_ip"], (
        "bind the dashboard to the head's private address, never 0.0.0.0 (docker runs with --net=host)"
    )
    assert flag_value(args, "--metrics-export-port")
    assert flag_value(args, "--object-store-memory")


def test_launcher_workers_join_the_head_and_export_metrics(launcher: dict[str, Any]) -> None:
    args = _start_args(launcher["worker_start_ray_commands"])
    assert flag_value(args, "--address") == "$RAY_HEAD_IP:6379"
    assert flag_value(args, "--metrics-export-port") == flag_value(
        _start_args(launcher["head_start_ray_commands"]), "--metrics-export-port"
    )


def test_launcher_shm_and_token(launcher: dict[str, Any]) -> None:
    options = launcher["docker"]["run_options"]
    (shm,) = [o.split("=", 1)[1] for o in options if o.startswith("--shm-size=")]
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        store = int(flag_value(_start_args(launcher[commands]), "--object-store-memory"))
        assert parse_size(shm) > store, f"{commands}: --shm-size {shm} <= object store {store}"
    assert "--env RAY_AUTH_MODE=token" in options
    (token_path,) = [o.split("=", 1)[1] for o in options if o.startswith("--env RAY_AUTH_TOKEN_PATH=")]
    assert token_path in launcher["file_mounts"], (
        "the token file must be mounted where RAY_AUTH_TOKEN_PATH points"
    )
    assert "RAY_AUTH_TOKEN=" not in LAUNCHER.read_text(), "never put the token itself in the launcher file"


# ---------------------------------------------------------------------- monitoring


def test_prometheus_scrapes_the_ray_head_and_every_worker(services: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    head_port = flag_value(command_args(services["ray-head"]), "--metrics-export-port")
    worker_port = flag_value(command_args(services["ray-worker"]), "--metrics-export-port")
    head_targets = {t for sc in jobs["ray-head"]["static_configs"] for t in sc["targets"]}
    assert f"ray-head:{head_port}" in head_targets
    (worker_sd,) = jobs["ray-worker"]["dns_sd_configs"]
    assert worker_sd["names"] == ["ray-worker"] and worker_sd["type"] == "A"
    assert str(worker_sd["port"]) == worker_port, "DNS discovery must use the workers' --metrics-export-port"
    for job in jobs.values():
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host = target.rsplit(":", 1)[0]
                assert host in services or host == "localhost", f"{job['job_name']}: unknown target {target}"


def test_grafana_datasource_matches_the_dashboards() -> None:
    (datasource,) = yaml.safe_load(GRAFANA_DATASOURCES.read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    dashboards = sorted(GRAFANA_DASHBOARDS.glob("*.json"))
    assert dashboards, "no dashboard JSON"
    for path in dashboards:
        text = path.read_text()
        uids = set(re.findall(r'"uid":\s*"([^"]+)"', text)) - {json.loads(text)["uid"]}
        assert uids == {datasource["uid"]}, f"{path.name} refers to datasources {uids}"


def _queries(dashboard: dict[str, Any]) -> list[str]:
    expressions = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        expressions += [target["expr"] for target in panel["targets"]]
    expressions += [
        var["query"]["query"] for var in dashboard["templating"]["list"] if var["type"] == "query"
    ]
    return expressions


def _metric_names(expression: str) -> set[str]:
    unquoted = re.sub(r'"[^"]*"', '""', expression)
    selectors = set(re.findall(r"\b([a-zA-Z_:][\w:]*)\s*\{", unquoted))
    return selectors | set(re.findall(r"\bray_\w+", unquoted))


@pytest.fixture(scope="module")
def rays_dashboard_metric_names() -> set[str]:
    """Metric names Ray's own Grafana dashboards query (installed ray package)."""
    panels = pytest.importorskip("ray.dashboard.modules.metrics.dashboards.default_dashboard_panels")
    return set(re.findall(r"\bray_\w+", Path(panels.__file__).read_text()))


@pytest.mark.parametrize("path", sorted(GRAFANA_DASHBOARDS.glob("*.json")), ids=lambda p: p.name)
def test_every_dashboard_query_names_an_existing_metric(
    path: Path, rays_dashboard_metric_names: set[str]
) -> None:
    dashboard = json.loads(path.read_text())
    known = APPLICATION_METRICS | rays_dashboard_metric_names
    used: set[str] = set()
    for expression in _queries(dashboard):
        names = _metric_names(expression)
        assert names, f"no metric in {expression!r}"
        unknown = names - known
        assert not unknown, (
            f"{path.name}: {sorted(unknown)} is neither ours nor exported by Ray: {expression}"
        )
        used |= names
    assert APPLICATION_METRICS <= used, f"{path.name} does not show {sorted(APPLICATION_METRICS - used)}"
    assert used & rays_dashboard_metric_names, f"{path.name} shows none of Ray's own cluster metrics"


def test_throughput_panels_are_rates_per_stage() -> None:
    dashboard = json.loads((GRAFANA_DASHBOARDS / "spatial-etl-throughput.json").read_text())
    expressions = _queries(dashboard)
    for metric in ("ray_spatial_etl_features_total", "ray_spatial_etl_bytes_total"):
        assert any(re.search(rf"sum by \(stage\) \(rate\({metric}\{{", expr) for expr in expressions), (
            f"no per-stage rate() of {metric}"
        )
