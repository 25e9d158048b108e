"""Config-file tests: the deployment and dependency files (compose, Dockerfiles, KubeRay,
cluster launcher, monitoring, dependency pins), offline. Every test here is marked ``config``
(``pytest -m config`` runs them alone); they run in the default suite too."""

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.config)
