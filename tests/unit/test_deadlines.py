"""Every blocking wait of the pipeline has a deadline (docs/limits.md, "Deadlines"): the
settings each client is built with, and, where a socket on 127.0.0.1 can stand in for a dead
server, that the wait really ends."""

import socket

import psycopg
import pytest

from etl_pipelines.resources import LedgerResource, RayResource
from etl_pipelines.resources.ray import wait_for_head
from libs.postgis import PostGISSettings, connection_parameters


@pytest.fixture
def silent_server():
    """A port that accepts connections and never answers: a server that hangs."""
    server = socket.create_server(("127.0.0.1", 0))
    yield server.getsockname()[1]
    server.close()


def test_postgis_connections_bound_connect_statements_and_a_vanished_server():
    params = connection_parameters(PostGISSettings("db", 5432, "etl", "secret"))
    assert params["connect_timeout"] == 10
    assert params["keepalives"] == 1
    # a dead peer is noticed within idle + count * interval = 60 s of silence
    assert params["keepalives_idle"] + params["keepalives_count"] * \
        params["keepalives_interval"] == 60
    assert params["tcp_user_timeout"] == 60_000
    assert "statement_timeout=600000" in params["options"]
    assert "lock_timeout=30000" in params["options"]


def test_a_postgis_server_that_never_answers_fails_the_connect(silent_server):
    settings = PostGISSettings("127.0.0.1", silent_server, "etl", "secret", connect_timeout_s=2)
    with pytest.raises(psycopg.OperationalError, match="timeout"):
        psycopg.connect(**connection_parameters(settings))


def test_the_ledger_client_bounds_selection_connect_and_each_answer():
    resource = LedgerResource(connection_string="mongodb://127.0.0.1:1/")
    client = resource.ledger.db.client
    try:
        assert client.options.server_selection_timeout == 10
        assert client.options.pool_options.connect_timeout == 5
        assert client.options.pool_options.socket_timeout == 30
    finally:
        client.close()


def test_the_ray_driver_gives_up_on_an_unreachable_head_naming_it():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed below: nothing listens there any more
    with pytest.raises(ConnectionError, match=rf"Ray head at 127\.0\.0\.1:{port} .* within 1\.5 s"):
        wait_for_head(f"127.0.0.1:{port}", 1.5)
    assert RayResource(address="127.0.0.1:1").connect_timeout_seconds == 60.0


def test_the_ray_driver_connects_once_the_head_listens(silent_server):
    wait_for_head(f"ray://127.0.0.1:{silent_server}", 1.0)
    wait_for_head("auto", 1.0)  # not host:port: left to Ray
