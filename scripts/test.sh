#!/usr/bin/env bash
# README command 2: set up everything, start the local stack, lint, run the whole test suite.
# A stack this script started is stopped again at the end; one already running is left up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
started_here=0
if ! .venv/bin/python scripts/stack.py status >/dev/null 2>&1; then
  started_here=1
fi
cleanup() { if [ "$started_here" = 1 ]; then .venv/bin/python scripts/stack.py down; fi; }
trap cleanup EXIT
.venv/bin/python scripts/stack.py up
.venv/bin/ruff check .
.venv/bin/pytest "$@"
