"""devstack: the env file round trip, the one file to source, and the Dagster wiring (no
service is started here)."""

import json
import re
import subprocess

import yaml

from devstack import stack
from devstack.dagster_local import CODE_SERVER_PORT, WORKSPACE_YAML, Dagster
from devstack.envfile import read_env_file, write_env_file
from devstack.s3 import POLICY_DIR, S3_IDENTITIES, identities_config


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


def test_an_older_env_file_is_upgraded_in_place(tmp_path, monkeypatch):
    # Before the object-store identities the file held one S3 key pair (root): it is kept as
    # the pipeline's (MINIO_ROOT_*), every identity it lacks is generated once, then reused.
    old = {"MINIO_ROOT_USER": "etl-old", "MINIO_ROOT_PASSWORD": "old-secret",
           "POSTGRES_USER": "spatial_etl", "POSTGRES_PASSWORD": "pg-secret"}
    env_file = tmp_path / "stack.env"
    write_env_file(env_file, old, "an env file from before the identities")
    monkeypatch.setattr(stack, "ENV_FILE", env_file)
    monkeypatch.setattr(stack, "ADMIN_ENV_FILE", tmp_path / "admin.env")
    creds = stack.credentials()
    assert old.items() <= creds.items()
    keys = [key for pair in S3_IDENTITIES.values() for key in pair[:2]]
    assert all(creds[key] for key in keys)
    assert len({creds[key] for key in keys}) == len(keys), "every identity has keys of its own"
    write_env_file(env_file, stack.stack_env(creds), "written by up")
    write_env_file(tmp_path / "admin.env", {k: creds[k] for k in stack.ADMIN_CREDENTIALS}, "up")
    assert stack.credentials() == creds


def test_seaweedfs_identities_attach_the_committed_policies():
    creds = {key: f"value-of-{key}" for key in {**stack.CREDENTIALS, **stack.ADMIN_CREDENTIALS}}
    config = json.loads(identities_config(creds))
    identities = {identity["name"]: identity for identity in config["identities"]}
    assert set(identities) == set(S3_IDENTITIES)
    policies = {policy["name"]: json.loads(policy["content"]) for policy in config["policies"]}
    for name, (access, secret, policy_file) in S3_IDENTITIES.items():
        identity = identities[name]
        assert identity["credentials"] == [{"accessKey": creds[access], "secretKey": creds[secret]}]
        if policy_file is None:
            assert identity["actions"] == ["Admin"] and "policyNames" not in identity
        else:
            # policies only: a legacy action such as "Write:<bucket>" would also grant deletes
            assert identity["policyNames"] == [name] and "actions" not in identity
            assert policies[name] == json.loads((POLICY_DIR / policy_file).read_text())


def test_an_older_env_file_gains_the_new_credentials_in_place(tmp_path, monkeypatch):
    """A stack.env written before the Ray token and the MongoDB users keeps its values and
    gains the new ones (generated once, on the next `up`)."""
    old = {"MINIO_ROOT_USER": "etl0123", "MINIO_ROOT_PASSWORD": "aa" * 20,
           "POSTGRES_USER": "spatial_etl", "POSTGRES_PASSWORD": "bb" * 16,
           "RAY_AUTH_MODE": "disabled"}
    env_file, admin_file = tmp_path / "stack.env", tmp_path / "admin.env"
    write_env_file(env_file, old, "an older stack")
    monkeypatch.setattr(stack, "ENV_FILE", env_file)
    monkeypatch.setattr(stack, "ADMIN_ENV_FILE", admin_file)
    creds = stack.credentials()
    assert {key: creds[key] for key in old if key in creds} == {
        key: value for key, value in old.items() if key in stack.CREDENTIALS}
    assert re.fullmatch(r"[0-9a-f]{64}", creds["RAY_AUTH_TOKEN"])
    assert creds["MONGO_PASSWORD"] and creds["MONGO_ADMIN_PASSWORD"]
    assert creds["MONGO_PASSWORD"] != creds["MONGO_ADMIN_PASSWORD"]
    env = stack.stack_env(creds)
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == creds["RAY_AUTH_TOKEN"]
    assert creds["MONGO_PASSWORD"] in env["MONGO_CONNECTION_STRING"]
    assert not [key for key in env if key in stack.ADMIN_CREDENTIALS], "they stay in admin.env"
    for key in ("MONGO_ADMIN_PASSWORD", "S3_ADMIN_SECRET_KEY"):
        assert creds[key] not in "".join(env.values())
