"""Shared test set-up: integration tests run against the local stack started by
``python -m devstack up``; its env file provides the contract's variables."""

import os
import secrets
import socket
import threading
from pathlib import Path

import pytest

from devstack.envfile import read_env_file
from devstack.layout import ENV_FILE
from devstack.ray_layout import RAY_ENV

INTEGRATION = Path(__file__).parent / "integration"


def pytest_configure(config):
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when first imported, and a config test
    # (tests/config/, collected before integration/) imports it before any stack_env fixture
    # runs: every driver in this process must keep 127.0.0.1, so set the stack's Ray env first.
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    # RAY_AUTH_MODE=token: every driver needs a token from the start, the stack's when it
    # exists (a throwaway local cluster of a unit test takes it too), else one for this
    # session only, so that Ray never generates one into ~/.ray/auth_token.
    stack_token = read_env_file(ENV_FILE).get("RAY_AUTH_TOKEN") if ENV_FILE.exists() else None
    os.environ.setdefault("RAY_AUTH_TOKEN", stack_token or secrets.token_hex(32))


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION in item.path.parents:
            item.add_marker(pytest.mark.integration)
    wants_stack = any(item.get_closest_marker("integration") for item in items)
    if wants_stack and not ENV_FILE.exists():
        pytest.exit(f"integration tests need the local stack: run `make test` or "
                    f"`.venv/bin/python -m devstack up` first ({ENV_FILE} is missing)",
                    returncode=4)


@pytest.fixture(scope="session")
def stack_env() -> dict[str, str]:
    """The stack's variables, also exported to this process (existing values win)."""
    env = read_env_file(ENV_FILE)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in env}


@pytest.fixture
def listener():
    """A TCP listener on 127.0.0.1 counting the connections it accepts: (port, accepted)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve():
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            accepted.append(connection.getpeername())
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    server.close()
    thread.join(timeout=5)
