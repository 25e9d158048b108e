"""docker-compose.yaml's PostGIS and MongoDB identities: each server's admin stays in that
server's service, the pipeline (user_code, the Ray nodes) gets its own least-privilege user,
created on first start by the init scripts under deploy/; the Dagster UI is on loopback."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from devstack.envfile import read_env_file
from tests.config.test_compose_and_images import (
    ENV_EXAMPLE,
    REPO,
    environment_of,
    load_compose,
    published_ports,
)

PIPELINE_SERVICES = ("user_code", "ray-head", "ray-worker")
DAGSTER_SERVICES = ("webserver", "daemon")
PIPELINE_ROLE_SQL = REPO / "deploy" / "postgis" / "pipeline-role.psql"


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return load_compose()["services"]


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """``{container path: host path}`` of a service's bind mounts."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = (
            (volume["source"], volume["target"]) if isinstance(volume, dict) else volume.split(":")[:2]
        )
        if source.startswith((".", "/")):
            found[target] = (REPO / source).resolve()
    return found


def admin_secrets(services: dict[str, Any]) -> dict[str, str]:
    postgis = environment_of(services["postgis"])
    mongo = environment_of(services["mongodb"])
    return {
        "PostGIS admin password": postgis["POSTGRES_PASSWORD"],
        "MongoDB root password": mongo["MONGO_INITDB_ROOT_PASSWORD"],
    }


def test_every_identity_has_its_own_credentials() -> None:
    values = read_env_file(ENV_EXAMPLE)
    passwords = {key: value for key, value in values.items() if "PASSWORD" in key}
    for key in (
        "POSTGRES_ADMIN_PASSWORD",
        "POSTGRES_PIPELINE_PASSWORD",
        "MONGO_ROOT_PASSWORD",
        "MONGO_PIPELINE_PASSWORD",
    ):
        assert key in passwords, f".env.example lacks {key}"
    assert len(set(passwords.values())) == len(passwords), (
        f"every identity needs a password of its own, .env.example shares some: {passwords}"
    )
    assert values["POSTGRES_ADMIN_USER"] != values["POSTGRES_PIPELINE_USER"]
    assert values["MONGO_ROOT_USER"] != values["MONGO_PIPELINE_USER"]


@pytest.mark.parametrize("service_name", [*PIPELINE_SERVICES, *DAGSTER_SERVICES])
def test_no_database_admin_credentials_outside_their_server(services, service_name) -> None:
    env = environment_of(services[service_name])
    for what, secret in admin_secrets(services).items():
        holders = [key for key, value in env.items() if secret in str(value)]
        assert not holders, f"{service_name} holds the {what} in {holders}"
    for key in env:
        assert not re.search(r"ADMIN|ROOT_USER|ROOT_PASSWORD|INITDB", key) or key.startswith("MINIO_"), (
            f"{service_name}: {key} is a server admin's variable"
        )


@pytest.mark.parametrize("service_name", PIPELINE_SERVICES)
def test_the_pipeline_uses_the_pipeline_postgis_role(services, service_name) -> None:
    env = environment_of(services[service_name])
    postgis = environment_of(services["postgis"])
    assert env["POSTGRES_USER"] == postgis["POSTGRES_PIPELINE_USER"]
    assert env["POSTGRES_PASSWORD"] == postgis["POSTGRES_PIPELINE_PASSWORD"]
    assert env["POSTGRES_USER"] != postgis["POSTGRES_USER"], "that is the image's superuser"


@pytest.mark.parametrize("service_name", PIPELINE_SERVICES)
def test_the_pipeline_uses_the_readwrite_mongo_user(services, service_name) -> None:
    uri = urllib.parse.urlsplit(environment_of(services[service_name])["MONGO_CONNECTION_STRING"])
    mongo = environment_of(services["mongodb"])
    assert (uri.username, uri.password) == (mongo["MONGO_PIPELINE_USER"], mongo["MONGO_PIPELINE_PASSWORD"])
    assert uri.username != mongo["MONGO_INITDB_ROOT_USERNAME"]
    assert uri.hostname == "mongodb" and uri.path == "/spatial_etl"
    assert urllib.parse.parse_qs(uri.query)["authSource"] == ["spatial_etl"]


def test_postgis_creates_the_pipeline_role_on_first_start(services) -> None:
    volumes = mounts(services["postgis"])
    hook = volumes.get("/docker-entrypoint-initdb.d/20-pipeline-role.sh")
    assert hook is not None and hook.is_file(), f"postgis mounts no pipeline-role hook: {volumes}"
    sql = volumes.get("/docker-entrypoint-initdb.d/pipeline-role.psql")
    assert sql == PIPELINE_ROLE_SQL.resolve(), "the same admin SQL as the local stack"
    script = hook.read_text()
    assert "POSTGRES_PIPELINE_USER" in script and "POSTGRES_PIPELINE_PASSWORD" in script
    assert "-v pipeline_password=" in script, "values go in as psql variables, not pasted SQL"
    assert "/docker-entrypoint-initdb.d/pipeline-role.psql" in script
    text = PIPELINE_ROLE_SQL.read_text()
    assert "NOSUPERUSER" in text and "CREATE EVENT TRIGGER" in text
    assert re.search(r"GRANT CONNECT, CREATE ON DATABASE", text)


def test_mongodb_creates_the_pipeline_user_on_first_start(services) -> None:
    volumes = mounts(services["mongodb"])
    script = volumes.get("/docker-entrypoint-initdb.d/10-pipeline-user.js")
    assert script is not None and script.is_file(), f"mongodb mounts no user script: {volumes}"
    text = script.read_text()
    assert "process.env.MONGO_PIPELINE_USER" in text and "process.env.MONGO_PIPELINE_PASSWORD" in text
    assert '[{ role: "readWrite", db: "spatial_etl" }]' in text
    assert "root" not in re.sub(r"//.*", "", text), "the pipeline user gets no root role"


def test_the_dagster_ui_is_published_on_loopback_only(services) -> None:
    ports = published_ports(services["webserver"])
    assert ports, "the webserver publishes its UI port"
    for host_ip, _published, target in ports:
        assert host_ip == "127.0.0.1", f"webserver:{target} is published on {host_ip or 'all'}"
    assert (REPO / "docs" / "webserver-proxy.md").is_file()
