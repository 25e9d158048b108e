import re
import uuid

import psycopg
import pytest
from pymongo import MongoClient

from libs.ledger import Ledger
from libs.object_store import ObjectStore, ObjectStoreSettings
from libs.postgis import PostGISSettings, connect


@pytest.fixture(scope="session")
def store(stack_env) -> ObjectStore:
    return ObjectStore(ObjectStoreSettings(stack_env["MINIO_ENDPOINT"],
                                           stack_env["MINIO_ROOT_USER"],
                                           stack_env["MINIO_ROOT_PASSWORD"]))


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
