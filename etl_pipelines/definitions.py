"""The one registration point of the code location: jobs, sensors, resources.

Every service setting is an ``EnvVar`` resolved when a run or a sensor tick starts, never
at import time, so the module loads anywhere (webserver, daemon, user-code server, tests).
"""

from __future__ import annotations

from dagster import Definitions, EnvVar

from etl_pipelines.jobs.ingest import ingest_batch
from etl_pipelines.resources import (
    InputLimitsResource,
    LedgerResource,
    ObjectStoreResource,
    PostGISResource,
    RayResource,
    RetentionResource,
    ScratchResource,
    StagingIOManager,
)
from etl_pipelines.sensors.janitor import (
    ledger_run_failure_sensor,
    postgis_schema_janitor,
    scratch_janitor,
    staging_janitor,
)
from etl_pipelines.sensors.manifests import manifest_sensor


def build_resources() -> dict[str, object]:
    """The resources, each wired to the contract's environment variables."""
    object_store = ObjectStoreResource(
        endpoint=EnvVar("MINIO_ENDPOINT"),
        access_key=EnvVar("MINIO_ROOT_USER"),
        secret_key=EnvVar("MINIO_ROOT_PASSWORD"),
    )
    return {
        "object_store": object_store,
        "io_manager": StagingIOManager(object_store=object_store),
        "input_limits": InputLimitsResource(),
        "scratch": ScratchResource(),
        "retention": RetentionResource(),
        "ledger": LedgerResource(connection_string=EnvVar("MONGO_CONNECTION_STRING")),
        "postgis_db": PostGISResource(
            host=EnvVar("POSTGRES_HOST"),
            port=EnvVar.int("POSTGRES_PORT"),
            user=EnvVar("POSTGRES_USER"),
            password=EnvVar("POSTGRES_PASSWORD"),
        ),
        "ray_cluster": RayResource(
            address=EnvVar("RAY_ADDRESS"),
            dashboard_url=EnvVar("RAY_DASHBOARD_URL"),
        ),
    }


defs = Definitions(
    jobs=[ingest_batch],
    sensors=[manifest_sensor, postgis_schema_janitor, ledger_run_failure_sensor,
             staging_janitor, scratch_janitor],
    resources=build_resources(),
)
