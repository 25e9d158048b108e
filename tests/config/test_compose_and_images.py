"""Offline checks of the deployment files: docker-compose.yaml, the two Dockerfiles,
dagster.yaml, workspace.yaml and .env.example.

No Docker engine and no running service is needed: the compose file is interpolated with
.env.example the way Compose does it, checked against the Compose Specification's JSON
Schema (vendored in check-jsonschema) and then structurally; the rest is parsed with PyYAML.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema

from devstack.envfile import read_env_file

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
DOCKERFILE_USER_CODE = REPO / "Dockerfile.user-code"
DAGSTER_YAML = REPO / "dagster.yaml"
WORKSPACE_YAML = REPO / "workspace.yaml"

# The environment contract of the code location (see the project brief).
CONTRACT_ENV_VARS = (
    "DAGSTER_POSTGRES_HOST",
    "DAGSTER_POSTGRES_USER",
    "DAGSTER_POSTGRES_PASSWORD",
    "DAGSTER_POSTGRES_DB",
    "MINIO_ENDPOINT",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "MONGO_CONNECTION_STRING",
    "POSTGRES_HOST",
    "POSTGRES_PORT",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "RAY_ADDRESS",
)
DAGSTER_STORAGE_ENV_VARS = CONTRACT_ENV_VARS[:4]

EXPECTED_SERVICES = {
    "minio",
    "minio-init",
    "mongodb",
    "postgis",
    "dagster-postgres",
    "user_code",
    "webserver",
    "daemon",
    "ray-head",
    "ray-worker",
}
ONE_SHOT_SERVICES = {"minio-init"}

# Who must wait for whom, and how.
EXPECTED_DEPENDENCIES = {
    "minio-init": {"minio": "service_healthy"},
    "user_code": {
        "dagster-postgres": "service_healthy",
        "postgis": "service_healthy",
        "mongodb": "service_healthy",
        "minio-init": "service_completed_successfully",
        "ray-head": "service_healthy",
    },
    "webserver": {"dagster-postgres": "service_healthy", "user_code": "service_healthy"},
    "daemon": {"dagster-postgres": "service_healthy", "user_code": "service_healthy"},
    "ray-worker": {"ray-head": "service_healthy"},
}

# (service, container port) pairs allowed on the host, and on which host address
# (None would be any address: nothing is).
ALLOWED_PUBLISHED = {
    ("webserver", 3000): "127.0.0.1",  # behind a proxy for others: docs/webserver-proxy.md
    ("minio", 9001): "127.0.0.1",
    ("ray-head", 8265): "127.0.0.1",
    ("prometheus", 9090): "127.0.0.1",  # monitoring profile
    ("grafana", 3000): "127.0.0.1",  # monitoring profile
}
RAY_PORTS = {6379, 8265, 10001, 52365, 8080, 44217, 44227}  # GCS, dashboard, client, agent, metrics
DATABASE_PORTS = {5432, 27017, 9000}  # Postgres/PostGIS, MongoDB, MinIO S3 API

RAY_SERVICES = ("ray-head", "ray-worker")
HEAVY_PACKAGES = {
    "ray",
    "geopandas",
    "dask-geopandas",
    "dask",
    "shapely",
    "pyarrow",
    "geoarrow-pyarrow",
    "pyogrio",
    "gdal",
    "fiona",
    "rasterio",
    "pyproj",
}


# ----------------------------------------------------------------------------- helpers


_VAR = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose-style interpolation of ${VAR}, ${VAR:-default}, ${VAR:?error} and $$."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg")
        value = env.get(name)
        unset_or_empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-") and unset_or_empty:
            return arg
        if op in (":?", "?") and unset_or_empty:
            raise AssertionError(f"required variable {name} is missing: {arg}")
        return value or ""

    return _VAR.sub(substitute, text)


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    env = read_env_file(ENV_EXAMPLE) if env is None else env
    return yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), env))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def depends_on_of(service: dict[str, Any]) -> dict[str, Any]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):  # short syntax: no condition at all
        return {name: None for name in deps}
    return deps


def published_ports(service: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(host_ip, published, container_port) for every `ports:` entry ('' = all addresses)."""
    result = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            host_ip, published = str(entry.get("host_ip", "")), str(entry.get("published", ""))
            result.append((host_ip, published, int(entry["target"])))
            continue
        spec = str(entry).split("/", 1)[0]
        parts = spec.split(":")
        if len(parts) == 1:
            host_ip, published, target = "", "", parts[0]
        elif len(parts) == 2:
            host_ip, (published, target) = "", parts
        else:
            host_ip, published, target = ":".join(parts[:-2]), parts[-2], parts[-1]
        result.append((host_ip, published, int(target.split("-", 1)[0])))
    return result


def parse_size(value: Any) -> int:
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)b?\s*", str(value).lower())
    assert match, f"cannot parse size {value!r}"
    power = " kmgt".index(match.group(2) or " ")
    return int(float(match.group(1)) * 1024**power)


def command_args(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def flag_value(args: list[str], flag: str) -> str | None:
    for index, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and index + 1 < len(args):
            return args[index + 1]
    return None


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"
    return instructions


def instruction_args(path: Path, keyword: str) -> list[str]:
    return [args for kw, args in dockerfile_instructions(path) if kw == keyword]


def requirement_names(path: Path) -> set[str]:
    names = set()
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        assert name, f"{path.name}: cannot read requirement {raw!r}"
        names.add(re.sub(r"[-_.]+", "-", name.group(0)).lower())
    return names


# ------------------------------------------------------ (a) the Compose Specification


def compose_schema_errors(compose: dict[str, Any]) -> list[str]:
    """Where ``compose`` breaks the Compose Specification's JSON Schema (the copy vendored in
    check-jsonschema: offline, no container engine), one line per error."""
    validator = jsonschema.Draft202012Validator(get_builtin_schema("vendor.compose-spec"))
    return sorted(f"{'/'.join(map(str, error.absolute_path)) or '(top level)'}: {error.message}"
                  for error in validator.iter_errors(compose))


def env_example_without(key: str) -> dict[str, str]:
    values = read_env_file(ENV_EXAMPLE)
    del values[key]
    return values


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    errors = compose_schema_errors(compose)
    assert not errors, "docker-compose.yaml (with .env.example) breaks the Compose Specification:\n" + \
        "\n".join(errors)


def test_the_schema_check_catches_a_broken_file(compose: dict[str, Any]) -> None:
    broken = {**compose, "services": {**compose["services"], "postgis": {
        **compose["services"]["postgis"], "restart": ["always"], "healthcheck": {"tets": "x"}}}}
    errors = compose_schema_errors(broken)
    assert any(e.startswith("services/postgis/restart") for e in errors), errors
    assert any(e.startswith("services/postgis/healthcheck") for e in errors), errors


def test_compose_refuses_to_start_without_the_ray_token() -> None:
    # ${RAY_AUTH_TOKEN:?...}: compose stops with this message before it starts anything
    with pytest.raises(AssertionError, match="RAY_AUTH_TOKEN"):
        load_compose(env_example_without("RAY_AUTH_TOKEN"))


# ---------------------------------------------------------- (b) compose structure


def test_expected_services_exist(services: dict[str, Any]) -> None:
    missing = EXPECTED_SERVICES - set(services)
    assert not missing, f"docker-compose.yaml lacks services: {sorted(missing)}"


def test_every_long_running_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if name in ONE_SHOT_SERVICES:
            continue
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), (
            f"service {name!r} has no healthcheck"
        )


def test_depends_on_always_states_a_condition(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for target, spec in depends_on_of(service).items():
            assert target in services, f"{name} depends on unknown service {target!r}"
            condition = spec.get("condition") if isinstance(spec, dict) else None
            assert condition in ("service_healthy", "service_completed_successfully"), (
                f"{name} -> {target}: depends_on needs condition service_healthy "
                f"(or service_completed_successfully for one-shot jobs), got {condition!r}"
            )
            if condition == "service_healthy":
                assert services[target].get("healthcheck"), (
                    f"{name} waits for {target} to be healthy, but {target} has no healthcheck"
                )
            else:
                assert target in ONE_SHOT_SERVICES, (
                    f"{name} waits for {target} to exit, but {target} is a long-running service"
                )


@pytest.mark.parametrize("service_name", sorted(EXPECTED_DEPENDENCIES))
def test_startup_order(services: dict[str, Any], service_name: str) -> None:
    actual = {
        target: (spec or {}).get("condition")
        for target, spec in depends_on_of(services[service_name]).items()
    }
    for target, condition in EXPECTED_DEPENDENCIES[service_name].items():
        assert actual.get(target) == condition, (
            f"{service_name} should depend on {target} with condition {condition}, got {actual.get(target)!r}"
        )


def test_user_code_gets_the_whole_env_contract(services: dict[str, Any]) -> None:
    env = environment_of(services["user_code"])
    missing = [var for var in CONTRACT_ENV_VARS if not env.get(var)]
    assert not missing, f"user_code lacks contract env vars: {missing}"
    assert env["RAY_ADDRESS"] == "ray://ray-head:10001", env["RAY_ADDRESS"]
    assert "://" not in env["MINIO_ENDPOINT"], "MINIO_ENDPOINT is host:port, without a scheme"
    assert env["MINIO_ENDPOINT"] == "minio:9000"
    assert env["POSTGRES_HOST"] == "postgis" and env["POSTGRES_PORT"] == "5432"
    assert env["DAGSTER_POSTGRES_HOST"] == "dagster-postgres"
    assert env["MONGO_CONNECTION_STRING"].startswith("mongodb://")
    assert "@mongodb:27017/spatial_etl" in env["MONGO_CONNECTION_STRING"]


def test_data_store_credentials_match_the_servers(services: dict[str, Any]) -> None:
    user_code = environment_of(services["user_code"])
    minio_init = environment_of(services["minio-init"])  # the contract's names, the pipeline user
    assert user_code["MINIO_ROOT_USER"] == minio_init["MINIO_PIPELINE_USER"]
    assert user_code["MINIO_ROOT_PASSWORD"] == minio_init["MINIO_PIPELINE_PASSWORD"]
    # PostGIS and MongoDB: the pipeline's own identities, test_compose_identities.py
    dagster_pg = environment_of(services["dagster-postgres"])
    for service_name in ("user_code", "webserver", "daemon"):
        env = environment_of(services[service_name])
        assert env["DAGSTER_POSTGRES_USER"] == dagster_pg["POSTGRES_USER"], service_name
        assert env["DAGSTER_POSTGRES_PASSWORD"] == dagster_pg["POSTGRES_PASSWORD"], service_name
        assert env["DAGSTER_POSTGRES_DB"] == dagster_pg["POSTGRES_DB"], service_name


def test_minio_init_creates_the_three_buckets(services: dict[str, Any]) -> None:
    init = services["minio-init"]
    assert str(init["image"]).split("/")[-1].startswith("mc:"), init["image"]
    script = " ".join(command_args(init)) + " ".join(map(str, init.get("entrypoint") or []))
    for bucket in ("landing-zone", "data-lake", "etl-staging"):
        assert bucket in script, f"minio-init does not create bucket {bucket}"
    assert "--ignore-existing" in script, "bucket creation must be idempotent"


def test_ray_token_auth_is_on_everywhere_with_one_token(services: dict[str, Any]) -> None:
    tokens = set()
    for name in (*RAY_SERVICES, "user_code"):
        env = environment_of(services[name])
        assert env.get("RAY_AUTH_MODE") == "token", f"{name}: RAY_AUTH_MODE must be 'token'"
        assert env.get("RAY_AUTH_TOKEN"), f"{name}: RAY_AUTH_TOKEN is not set"
        tokens.add(env["RAY_AUTH_TOKEN"])
    assert len(tokens) == 1, "the Ray nodes and the driver must share one RAY_AUTH_TOKEN"


def test_secrets_have_no_defaults_in_compose() -> None:
    text = COMPOSE_FILE.read_text()
    for match in re.finditer(r"\$\{(\w*(?:PASSWORD|TOKEN|_USER)\w*)(:?[-?])?", text):
        name, op = match.group(1), match.group(2)
        assert op == ":?", (
            f"docker-compose.yaml: ${{{name}}} must be required with ${{{name}:?...}}, "
            f"not defaulted (found operator {op!r})"
        )


def test_env_example_covers_required_variables_with_placeholders() -> None:
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE_FILE.read_text()))
    values = read_env_file(ENV_EXAMPLE)
    missing = required - set(values)
    assert not missing, f".env.example lacks required variables: {sorted(missing)}"
    for key, value in values.items():
        if "PASSWORD" in key or "TOKEN" in key:
            assert "change-me" in value, f".env.example: {key} must be a change-me placeholder"
    assert "cp .env.example .env" in ENV_EXAMPLE.read_text()


def test_only_the_ui_minio_console_and_ray_dashboard_are_published(
    services: dict[str, Any],
) -> None:
    seen = set()
    for name, service in services.items():
        for host_ip, published, target in published_ports(service):
            key = (name, target)
            assert key in ALLOWED_PUBLISHED, (
                f"{name} publishes container port {target} on the host "
                f"({host_ip or '0.0.0.0'}:{published}); only {sorted(ALLOWED_PUBLISHED)} may be"
            )
            required_ip = ALLOWED_PUBLISHED[key]
            if required_ip is not None:
                assert host_ip == required_ip, (
                    f"{name}:{target} must be bound to {required_ip}, got {host_ip or 'all'}"
                )
            seen.add(key)
    assert seen == set(ALLOWED_PUBLISHED), f"published ports: {sorted(seen)}"


def test_no_ray_or_database_port_is_reachable_beyond_loopback(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for host_ip, published, target in published_ports(service):
            published_port = int(published) if published.isdigit() else None
            if target in RAY_PORTS | DATABASE_PORTS or published_port in RAY_PORTS | DATABASE_PORTS:
                assert host_ip == "127.0.0.1", (
                    f"{name} publishes {target} on {host_ip or 'all interfaces'}: Ray and "
                    "database ports may only be bound to 127.0.0.1"
                )


def test_ray_worker_is_scalable(services: dict[str, Any]) -> None:
    worker = services["ray-worker"]
    assert "container_name" not in worker, "ray-worker must not set container_name (--scale)"
    assert not worker.get("ports"), "ray-worker must not publish host ports (--scale)"
    args = command_args(worker)
    assert args[:2] == ["ray", "start"] and "--block" in args
    assert flag_value(args, "--address") == "ray-head:6379"


def test_ray_head_command(services: dict[str, Any]) -> None:
    args = command_args(services["ray-head"])
    assert args[:2] == ["ray", "start"]
    assert "--head" in args and "--block" in args
    assert flag_value(args, "--port") == "6379"
    assert flag_value(args, "--ray-client-server-port") == "10001"


@pytest.mark.parametrize("service_name", RAY_SERVICES)
def test_ray_shm_is_larger_than_the_object_store(services: dict[str, Any], service_name: str) -> None:
    service = services[service_name]
    assert "shm_size" in service, f"{service_name}: set shm_size, Docker's 64 MB is too small"
    shm = parse_size(service["shm_size"])
    store = flag_value(command_args(service), "--object-store-memory")
    assert store is not None, f"{service_name}: pass --object-store-memory explicitly"
    assert shm > int(store), f"{service_name}: shm_size {shm} <= object store {store}"


@pytest.mark.parametrize("service_name", ["user_code", *RAY_SERVICES])
def test_user_code_and_ray_share_one_image(services: dict[str, Any], service_name: str) -> None:
    service = services[service_name]
    assert service["build"]["dockerfile"] == "Dockerfile.user-code"
    assert service["image"] == services["user_code"]["image"]


@pytest.mark.parametrize("service_name", ["webserver", "daemon"])
def test_webserver_and_daemon_use_the_light_image(services: dict[str, Any], service_name: str) -> None:
    service = services[service_name]
    assert service["build"]["dockerfile"] == "Dockerfile"
    env = environment_of(service)
    missing = [var for var in DAGSTER_STORAGE_ENV_VARS if not env.get(var)]
    assert not missing, f"{service_name} lacks {missing}"
    assert "RAY_AUTH_TOKEN" not in env, f"{service_name} does not talk to Ray: no token there"


# ------------------------------------------------------------------------ images


def test_webserver_image_is_light() -> None:
    text = DOCKERFILE.read_text()
    froms = instruction_args(DOCKERFILE, "FROM")
    assert len(froms) == 1 and froms[0].startswith("python:3.11-slim"), froms
    for word in ("gdal", "geopandas", "pyogrio", r"\bray\b"):
        assert not re.search(word, text, re.IGNORECASE), f"Dockerfile mentions {word!r}"
    for keyword in ("RUN", "COPY", "ADD"):
        for args in instruction_args(DOCKERFILE, keyword):
            assert "requirements-user-code" not in args, f"Dockerfile {keyword} {args}"
    runs = " ".join(instruction_args(DOCKERFILE, "RUN"))
    assert re.search(r"pip install (.* )?-r \S*requirements\.txt", runs), runs


def test_webserver_image_layout() -> None:
    envs = " ".join(instruction_args(DOCKERFILE, "ENV"))
    assert "DAGSTER_HOME=/opt/dagster/dagster_home" in envs
    copies = instruction_args(DOCKERFILE, "COPY")
    assert any("dagster.yaml" in c and "workspace.yaml" in c and "DAGSTER_HOME" in c for c in copies), (
        f"copy dagster.yaml and workspace.yaml into $DAGSTER_HOME: {copies}"
    )
    # the run launcher dagster.yaml names, and nothing else of the project
    assert any(c.split()[0] == "run_health" for c in copies), copies
    assert not any(c.split()[0] in ("libs", "etl_pipelines", ".") for c in copies), copies
    assert "PYTHONPATH=/opt/dagster/lib" in envs
    users = instruction_args(DOCKERFILE, "USER")
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"


def test_user_code_image_installs_heavy_requirements_and_the_project() -> None:
    froms = instruction_args(DOCKERFILE_USER_CODE, "FROM")
    args = instruction_args(DOCKERFILE_USER_CODE, "ARG")
    base = " ".join(froms + args)
    assert "osgeo/gdal" in base, f"Dockerfile.user-code should build FROM a GDAL image: {base}"
    runs = instruction_args(DOCKERFILE_USER_CODE, "RUN")
    assert any(re.search(r"pip install (.* )?-r \S*requirements-user-code\.txt", r) for r in runs)
    assert any("pip install --no-deps" in r for r in runs), "install the project with --no-deps"
    copies = " ".join(instruction_args(DOCKERFILE_USER_CODE, "COPY"))
    needed = ("requirements-user-code.txt", "pyproject.toml", "README.md", "libs", "etl_pipelines",
              "run_health")
    for path in needed:
        assert path in copies, f"Dockerfile.user-code does not COPY {path}"
    users = instruction_args(DOCKERFILE_USER_CODE, "USER")
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"


def test_user_code_image_default_command_is_the_code_server() -> None:
    cmds = instruction_args(DOCKERFILE_USER_CODE, "CMD")
    assert cmds, "Dockerfile.user-code has no CMD"
    cmd = yaml.safe_load(cmds[-1])  # exec form is a JSON array
    assert cmd[:3] == ["dagster", "code-server", "start"], cmd
    assert flag_value(cmd, "-h") == "0.0.0.0"
    assert flag_value(cmd, "-p") == "4000"
    assert flag_value(cmd, "-m") == "etl_pipelines.definitions"


def test_requirements_txt_has_no_heavy_dependency() -> None:
    heavy = requirement_names(REPO / "requirements.txt") & HEAVY_PACKAGES
    assert not heavy, f"requirements.txt (webserver/daemon image) must stay light: {sorted(heavy)}"


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    patterns = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (".venv", ".state", ".git", ".env", "**/__pycache__", ".pytest_cache"):
        assert needed in patterns, f".dockerignore should exclude {needed}"


# -------------------------------------------------- (c) workspace.yaml and dagster.yaml


def test_workspace_points_at_the_user_code_service(services: dict[str, Any]) -> None:
    workspace = yaml.safe_load(WORKSPACE_YAML.read_text())
    servers = [entry["grpc_server"] for entry in workspace["load_from"] if "grpc_server" in entry]
    assert len(servers) == 1, workspace
    server = servers[0]
    assert server["host"] == "user_code" and server["host"] in services
    assert int(server["port"]) == 4000
    assert "4000" in [str(port) for port in services["user_code"].get("expose", [])]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert server["location_name"] == pyproject["tool"]["dagster"]["code_location_name"]


def test_dagster_yaml_reads_postgres_settings_from_env() -> None:
    instance = yaml.safe_load(DAGSTER_YAML.read_text())
    db = instance["storage"]["postgres"]["postgres_db"]
    for field, var in (
        ("hostname", "DAGSTER_POSTGRES_HOST"),
        ("username", "DAGSTER_POSTGRES_USER"),
        ("password", "DAGSTER_POSTGRES_PASSWORD"),
        ("db_name", "DAGSTER_POSTGRES_DB"),
    ):
        assert db[field] == {"env": var}, f"dagster.yaml postgres_db.{field} must be env: {var}"
    assert db["scheme"] == "postgresql+psycopg2", "SQLAlchemy 2.1 needs the psycopg2 scheme"


def test_dagster_yaml_run_coordination_and_telemetry() -> None:
    instance = yaml.safe_load(DAGSTER_YAML.read_text())
    coordinator = instance["run_coordinator"]
    assert coordinator["class"] == "QueuedRunCoordinator"
    limit = coordinator["config"]["max_concurrent_runs"]
    assert isinstance(limit, int) and limit > 0
    launcher = instance["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("run_health.launcher", "HeartbeatRunLauncher")
    assert launcher["config"]["heartbeat_timeout_seconds"] > 0
    assert instance["telemetry"] == {"enabled": False}


def test_dagster_yaml_env_vars_are_set_wherever_the_instance_is_loaded(
    services: dict[str, Any],
) -> None:
    referenced = set(re.findall(r"env:\s*(\w+)", DAGSTER_YAML.read_text()))
    assert referenced == set(DAGSTER_STORAGE_ENV_VARS)
    for name in ("webserver", "daemon", "user_code"):
        env = environment_of(services[name])
        missing = sorted(var for var in referenced if not env.get(var))
        assert not missing, f"{name} loads dagster.yaml but lacks {missing}"


def test_dagster_accepts_the_instance_config(monkeypatch: pytest.MonkeyPatch) -> None:
    config_module = pytest.importorskip("dagster._core.instance.config")
    pytest.importorskip("dagster_postgres")
    from dagster._config import process_config, resolve_to_config_type
    from dagster_postgres import DagsterPostgresStorage
    from dagster_postgres.utils import pg_url_from_config

    config, _ = config_module.dagster_instance_config(str(REPO))  # raises if invalid
    for var, value in zip(DAGSTER_STORAGE_ENV_VARS, ("db-host", "dagster", "p@ss", "dagster"), strict=True):
        monkeypatch.setenv(var, value)
    schema = resolve_to_config_type(DagsterPostgresStorage.config_type())
    resolved = process_config(schema, config["storage"]["postgres"])
    assert resolved.success, resolved.errors
    assert pg_url_from_config(resolved.value) == "postgresql+psycopg2://dagster:p%40ss@db-host:5432/dagster"
