#!/usr/bin/env bash
# README command 1: set up everything, start the local stack with Dagster, run the sample batch.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m devstack up --dagster
.venv/bin/python -m devstack.demo "$@"
