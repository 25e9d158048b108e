#!/usr/bin/env bash
# Machine setup for local development on Debian 12 (Python 3.11). Idempotent.
#
#   bash scripts/setup.sh        # as root, or as a user with sudo
#
# Installs the Debian packages the project needs (only the missing ones), creates
# .venv and installs requirements-dev.txt, requirements-bench.txt (the benchmarks'
# peers and chart) and the project itself (editable),
# skipping pip when nothing it depends on changed since the last run.
# Nothing is started here: `python -m devstack up` runs the services, on their own
# ports. In particular the Debian PostgreSQL cluster `main` (port 5432) that the
# postgresql-15 package creates is not ours: we neither use, start nor stop it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

# No container engine: docker-compose.yaml is checked against the Compose Specification's schema
# in Python (tests/config/test_compose_and_images.py), not by `docker compose config`.
APT_PACKAGES=(postgresql-15 postgresql-15-postgis-3 gdal-bin python3-venv)
PYTHON="${PYTHON:-python3}"
VENV="$REPO/.venv"
STAMP="$VENV/.spatial-etl-requirements.sha256"

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo)
else
  SUDO=()
fi

# --- Debian packages -----------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$pkg")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] && [ "${#SUDO[@]}" -eq 0 ]; then
    die "missing packages (${missing[*]}) and neither root nor sudo available"
  fi
  log "apt: installing ${missing[*]}"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
else
  log "apt: all packages present (${APT_PACKAGES[*]})"
fi

if command -v pg_lsclusters >/dev/null 2>&1 && pg_lsclusters -h 2>/dev/null | grep -q '^15 \+main '; then
  log "note: the system PostgreSQL cluster 15/main (port 5432) is left as it is; the stack runs its own on 127.0.0.1:55432"
fi

# --- Python virtualenv ---------------------------------------------------------
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (need Python 3.11)"
py_version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[ "$py_version" = "3.11" ] || die "$PYTHON is Python $py_version; need 3.11 (set PYTHON=/path/to/python3.11)"

if [ ! -x "$VENV/bin/python" ]; then
  log "venv: creating $VENV with $PYTHON ($py_version)"
  "$PYTHON" -m venv "$VENV"
else
  log "venv: $VENV exists"
fi

# The stamp is the hash of everything pip's result depends on; a match means
# the venv already holds exactly these requirements.
wanted="$(cat requirements-dev.txt requirements-user-code.txt requirements-bench.txt pyproject.toml \
  | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$wanted" ]; then
  log "pip: requirements unchanged since last install, skipping"
else
  log "pip: installing requirements-dev.txt"
  "$VENV/bin/python" -m pip install -q -r requirements-dev.txt
  log "pip: installing requirements-bench.txt"
  "$VENV/bin/python" -m pip install -q -r requirements-bench.txt
  log "pip: installing the project (editable, --no-deps)"
  "$VENV/bin/python" -m pip install -q -e . --no-deps
  printf '%s\n' "$wanted" > "$STAMP"
fi

log "done; next: .venv/bin/python -m devstack up"
