#!/usr/bin/env bash
# postgis image initdb hook (runs once, on an empty volume, as the image's admin
# POSTGRES_USER): create the pipeline's non-superuser role from POSTGRES_PIPELINE_USER/
# POSTGRES_PIPELINE_PASSWORD and install its guards (pipeline-role.psql, shared with the
# local stack). For a volume initialised before this existed, run it once by hand:
#   docker compose exec postgis bash /docker-entrypoint-initdb.d/20-pipeline-role.sh
set -euo pipefail
: "${POSTGRES_PIPELINE_USER:?set POSTGRES_PIPELINE_USER}" "${POSTGRES_PIPELINE_PASSWORD:?set POSTGRES_PIPELINE_PASSWORD}"
# -v values travel as psql variables (quoted with :'name'), never pasted into SQL text.
psql -X -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname spatial_compute \
  -v pipeline_user="$POSTGRES_PIPELINE_USER" -v pipeline_password="$POSTGRES_PIPELINE_PASSWORD" \
  -f /docker-entrypoint-initdb.d/pipeline-role.psql
