# syntax=docker/dockerfile:1
#
# Dagster webserver + daemon image (one image, two services in docker-compose.yaml).
#
# It only needs Dagster itself: the code location runs in its own image
# (Dockerfile.user-code) and is reached over gRPC, so nothing spatial and no
# compute library belongs here. Keep it to requirements.txt.
#
#   docker build -t spatial-etl-dagster -f Dockerfile .
#
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/dagster_home

# Pinned, light dependency set: dagster, dagster-webserver, dagster-postgres, dagster-aws.
COPY requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt \
    && pip check \
    && rm /tmp/requirements.txt

# The run launcher dagster.yaml names (run_health.launcher: dagster + stdlib only, no other
# project code), importable by the webserver and the daemon.
COPY run_health /opt/dagster/lib/run_health
ENV PYTHONPATH=/opt/dagster/lib

# Non-root user. UID/GID 10001 is shared with the user-code image so that the
# dagster-storage volume (compute logs, local artifacts) is writable from both.
RUN groupadd --gid 10001 dagster \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin dagster \
    && mkdir -p "${DAGSTER_HOME}/storage" \
    && chown -R dagster:dagster "${DAGSTER_HOME}/storage"

# Instance config (Postgres storage, queued run coordinator) and the workspace
# pointing at the user_code gRPC server. Root-owned: read-only for the service.
COPY dagster.yaml workspace.yaml ${DAGSTER_HOME}/

WORKDIR ${DAGSTER_HOME}
USER dagster

EXPOSE 3000

# Default: the webserver. The daemon service overrides this with `dagster-daemon run`.
CMD ["dagster-webserver", "-h", "0.0.0.0", "-p", "3000", "-w", "workspace.yaml"]
