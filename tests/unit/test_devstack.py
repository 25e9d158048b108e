"""devstack: the env file round trip, the one file to source, and the Dagster wiring (no
service is started here)."""

import subprocess

import yaml

from devstack import stack
from devstack.dagster_local import CODE_SERVER_PORT, WORKSPACE_YAML, Dagster
from devstack.envfile import read_env_file, write_env_file


def test_env_file_round_trips_through_the_reader_and_a_shell(tmp_path):
    values = {"PLAIN": "abc", "QUOTE": "it's", "SPACES": "a b  c", "EMPTY": "", "DOLLAR": "$HOME"}
    path = tmp_path / "x.env"
    write_env_file(path, values, "header\nsecond line")
    assert read_env_file(path) == values
    assert path.stat().st_mode & 0o777 == 0o600
    shell = subprocess.run(["bash", "-c", f"source {path}; printf '%s|' \"$QUOTE\" \"$SPACES\" \"$DOLLAR\""],
                           capture_output=True, text=True, check=True)
    assert shell.stdout == "it's|a b  c|$HOME|"


def test_compose_style_env_file_reads_the_same(tmp_path):
    path = tmp_path / ".env"
    path.write_text("# comment\nA=1\n\nB=change-me-b\n# C=3\n")
    assert read_env_file(path) == {"A": "1", "B": "change-me-b"}


def test_the_one_env_file_carries_the_endpoints_and_the_credentials():
    creds = {key: f"value-of-{key}" for key in stack.CREDENTIALS}
    env = stack.stack_env(creds)
    assert creds.items() <= env.items()
    for key in ("MINIO_ENDPOINT", "MONGO_CONNECTION_STRING", "POSTGRES_HOST", "POSTGRES_PORT",
                "RAY_ADDRESS", "RAY_DASHBOARD_URL", "DAGSTER_HOME", "RAY_AUTH_MODE"):
        assert env[key], key


def test_daemon_and_webserver_load_the_location_from_one_code_server():
    dagster = Dagster("etl_pipelines.definitions", {})
    workspace = yaml.safe_load(WORKSPACE_YAML.format(host="127.0.0.1", port=CODE_SERVER_PORT,
                                                     module=dagster.module))
    (entry,) = workspace["load_from"]
    assert entry["grpc_server"] == {"host": "127.0.0.1", "port": CODE_SERVER_PORT,
                                    "location_name": "etl_pipelines.definitions"}
    assert "-m" not in dagster.daemon.argv and "-w" in dagster.daemon.argv
    assert "-m" not in dagster.webserver.argv and "-w" in dagster.webserver.argv
    assert dagster.code_server.argv[1:4] == ["code-server", "start", "-m"]
