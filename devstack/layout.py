"""Where the stack keeps its state (all under ``<repo>/.state/``, git-ignored) and where it binds."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STATE = REPO / ".state"
LOGS = STATE / "logs"
PIDS = STATE / "pids"
#: The one file to source: every endpoint and the generated local credentials.
ENV_FILE = STATE / "stack.env"
#: The admin identities the stack uses to create the others (never sourced by the pipeline).
ADMIN_ENV_FILE = STATE / "admin.env"
DAGSTER_HOME = STATE / "dagster_home"
DAGSTER_ENABLED_MARKER = STATE / "dagster.enabled"
# Not resolved: the venv's bin/python is a symlink, its entry points sit next to it.
VENV_BIN = Path(sys.executable).parent

LOOPBACK = "127.0.0.1"
