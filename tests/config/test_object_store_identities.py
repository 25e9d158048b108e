"""Offline checks of the object-store identities in compose: minio-init creates one MinIO
user per identity with the policy committed in deploy/s3-policies/, no service but minio and
minio-init sees the root credentials, and each policy grants exactly what its identity needs
(the local stack attaches the same files to SeaweedFS identities: tests/unit/test_devstack.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from devstack.envfile import read_env_file
from tests.config.test_compose_and_images import ENV_EXAMPLE, REPO, command_args, environment_of, load_compose

POLICY_DIR = REPO / "deploy" / "s3-policies"
ROOT_SERVICES = {"minio", "minio-init"}
# identity (= policy file name) -> the .env variables of its user and password
IDENTITY_VARS = {
    "landing": ("MINIO_LANDING_USER", "MINIO_LANDING_PASSWORD"),
    "pipeline": ("MINIO_PIPELINE_USER", "MINIO_PIPELINE_PASSWORD"),
    "lake-reader": ("MINIO_LAKE_READER_USER", "MINIO_LAKE_READER_PASSWORD"),
}
OBJECTS = "s3:GetObject s3:PutObject s3:DeleteObject s3:AbortMultipartUpload".split()
# (action, resource) pairs each policy grants, resources without the arn:aws:s3::: prefix.
EXPECTED_GRANTS = {
    "landing": {
        ("s3:PutObject", "landing-zone/*"),
        ("s3:AbortMultipartUpload", "landing-zone/*"),
        ("s3:GetBucketLocation", "landing-zone"),
    },
    "pipeline": {
        ("s3:GetObject", "landing-zone/*"),
        ("s3:ListBucket", "landing-zone"),
        ("s3:GetBucketLocation", "landing-zone"),
    }
    | {(action, f"{bucket}/*") for action in OBJECTS for bucket in ("etl-staging", "data-lake")}
    | {
        (action, bucket)
        for action in ("s3:ListBucket", "s3:GetBucketLocation")
        for bucket in ("etl-staging", "data-lake")
    },
    "lake-reader": {
        ("s3:GetObject", "data-lake/*"),
        ("s3:ListBucket", "data-lake"),
        ("s3:GetBucketLocation", "data-lake"),
    },
}


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return load_compose()["services"]


def grants(policy_file: Path) -> set[tuple[str, str]]:
    document = json.loads(policy_file.read_text())
    pairs = set()
    for statement in document["Statement"]:
        assert statement["Effect"] == "Allow", f"{policy_file.name}: only Allow statements expected"
        assert set(statement) <= {"Sid", "Effect", "Action", "Resource"}, f"{policy_file.name}: {statement}"
        for action in statement["Action"]:
            for resource in statement["Resource"]:
                assert resource.startswith("arn:aws:s3:::"), f"{policy_file.name}: {resource}"
                pairs.add((action, resource.removeprefix("arn:aws:s3:::")))
    return pairs


@pytest.mark.parametrize("identity", sorted(EXPECTED_GRANTS))
def test_each_policy_grants_exactly_what_its_identity_needs(identity: str) -> None:
    granted = grants(POLICY_DIR / f"{identity}.json")
    assert granted == EXPECTED_GRANTS[identity], (
        f"deploy/s3-policies/{identity}.json: extra {sorted(granted - EXPECTED_GRANTS[identity])}, "
        f"missing {sorted(EXPECTED_GRANTS[identity] - granted)}"
    )


def test_nobody_but_the_pipeline_writes_staging_or_the_lake_and_nobody_changes_landing() -> None:
    writes = {
        identity: {
            resource
            for action, resource in grants(POLICY_DIR / f"{identity}.json")
            if action in ("s3:PutObject", "s3:DeleteObject")
        }
        for identity in EXPECTED_GRANTS
    }
    assert writes == {
        "landing": {"landing-zone/*"},
        "lake-reader": set(),
        "pipeline": {"etl-staging/*", "data-lake/*"},
    }
    deletes = {
        (identity, resource)
        for identity in EXPECTED_GRANTS
        for action, resource in grants(POLICY_DIR / f"{identity}.json")
        if action == "s3:DeleteObject"
    }
    assert not any(resource.startswith("landing-zone") for _, resource in deletes), deletes


def test_no_service_but_minio_and_minio_init_gets_the_root_credentials(services) -> None:
    env = read_env_file(ENV_EXAMPLE)
    root = {env["MINIO_ROOT_USER"], env["MINIO_ROOT_PASSWORD"]}
    for name, service in services.items():
        if name in ROOT_SERVICES:
            continue
        leaked = [key for key, value in environment_of(service).items() if any(r in value for r in root)]
        assert not leaked, f"{name} receives MinIO root credentials in {leaked}"
    for name in ("user_code", "ray-head", "ray-worker"):
        service_env = environment_of(services[name])
        assert service_env["MINIO_ROOT_USER"] == env["MINIO_PIPELINE_USER"], name
        assert service_env["MINIO_ROOT_PASSWORD"] == env["MINIO_PIPELINE_PASSWORD"], name


def test_minio_init_creates_each_user_and_attaches_its_policy(services) -> None:
    init = services["minio-init"]
    assert "./deploy/s3-policies:/policies:ro" in init.get("volumes", []), "policies mounted read-only"
    script = "\n".join(command_args(init))
    # the one function every identity goes through, then one call per identity
    body = re.search(r"identity\(\)\s*\{(.*?)\n\s*\}", script, re.S)
    assert body, f"minio-init defines no identity() function:\n{script}"
    steps = [line.split("#")[0].strip() for line in body.group(1).splitlines() if line.split("#")[0].strip()]
    assert steps == [
        'mc admin policy create spatial "spatial-$1" "/policies/$1.json"',
        'mc admin user add spatial "$2" "$3"',
        'mc admin policy attach spatial "spatial-$1" --user "$2"',
    ], steps
    env = environment_of(init)
    for identity, (user, password) in IDENTITY_VARS.items():
        call = f'identity {identity} "${user}" "${password}"'
        assert call in script, f"minio-init does not create {identity}: no line {call!r}"
        assert env[user] and env[password], f"minio-init lacks {user}/{password}"
        assert (POLICY_DIR / f"{identity}.json").is_file()
    users = [env[user] for user, _ in IDENTITY_VARS.values()] + [env["MINIO_ROOT_USER"]]
    assert len(set(users)) == len(users), "every identity is a user of its own"
    assert script.index("mc mb") < script.index("identity landing"), "buckets before users"
