import re
import uuid

import psycopg
import pytest
from pymongo import MongoClient

from devstack.s3 import store_settings
from libs.ledger import Ledger
from libs.object_store import ObjectStore
from libs.postgis import PostGISSettings, connect


@pytest.fixture(scope="session")
def store(stack_env) -> ObjectStore:
    """The pipeline's identity (the contract's MINIO_ROOT_USER): tests look where the
    pipeline looks, and plant in staging what an op would have written."""
    return ObjectStore(store_settings(stack_env, "pipeline"))


@pytest.fixture(scope="session")
def landing_store(stack_env) -> ObjectStore:
    """A data team's identity: writes landing-zone, nothing else (not even reads)."""
    return ObjectStore(store_settings(stack_env, "landing"))


@pytest.fixture(scope="session")
def lake_reader(stack_env) -> ObjectStore:
    """A lake consumer's identity: reads data-lake, nothing else."""
    return ObjectStore(store_settings(stack_env, "lake-reader"))


@pytest.fixture(scope="session")
def ledger(stack_env) -> Ledger:
    client = MongoClient(stack_env["MONGO_CONNECTION_STRING"], tz_aware=True)
    yield Ledger(client)
    client.close()


@pytest.fixture(scope="session")
def postgis_settings(stack_env) -> PostGISSettings:
    return PostGISSettings(stack_env["POSTGRES_HOST"], int(stack_env["POSTGRES_PORT"]),
                           stack_env["POSTGRES_USER"], stack_env["POSTGRES_PASSWORD"])


@pytest.fixture
def pg(postgis_settings) -> psycopg.Connection:
    with connect(postgis_settings, autocommit=True) as conn:
        yield conn


@pytest.fixture
def batch_id(request) -> str:
    """A batch id no other test (or earlier session) has used."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:40].strip("-")
    return f"{name}-{uuid.uuid4().hex[:8]}"
