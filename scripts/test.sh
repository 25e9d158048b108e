#!/usr/bin/env bash
# README command 2: set up everything, start the local stack, lint, run the whole test suite,
# then the CI benchmark step (small sizes) and its ratio gate against benchmarks/baseline.json
# (BENCH_SKIP=1 leaves the benchmarks out). A stack this script started is stopped again at
# the end; one already running is left up. Exits non-zero if a test, a benchmark or the gate fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
started_here=0
if ! .venv/bin/python -m devstack status >/dev/null 2>&1; then
  started_here=1
fi
cleanup() { if [ "$started_here" = 1 ]; then .venv/bin/python -m devstack down; fi; }
trap cleanup EXIT
.venv/bin/python -m devstack up
.venv/bin/ruff check .
.venv/bin/pytest "$@"
if [ "${BENCH_SKIP:-0}" != 1 ]; then
  bash scripts/bench.sh --ci
fi
