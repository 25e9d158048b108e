"""Shared test set-up: integration tests run against the local stack started by
``scripts/stack.py up``; its environment file provides the contract's variables."""

import os
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STACK_ENV = REPO / ".state" / "stack.env"


def read_stack_env(path: Path = STACK_ENV) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ")
        key, _, value = line.partition("=")
        env[key] = shlex.split(value)[0] if value else ""
    return env


def pytest_collection_modifyitems(config, items):
    wants_stack = any(item.get_closest_marker("integration") for item in items)
    if wants_stack and not STACK_ENV.exists():
        pytest.exit(f"integration tests need the local stack: run `make test` or "
                    f"`.venv/bin/python scripts/stack.py up` first ({STACK_ENV} is missing)",
                    returncode=4)


@pytest.fixture(scope="session")
def stack_env() -> dict[str, str]:
    """The stack's variables, also exported to this process (existing values win)."""
    env = read_stack_env()
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in env}
