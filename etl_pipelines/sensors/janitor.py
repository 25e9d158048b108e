"""Janitors: drop PostGIS schemas that outlived their run; record failed runs in the ledger."""

from dagster import (
    DagsterRunStatus,
    DefaultSensorStatus,
    RunFailureSensorContext,
    SensorEvaluationContext,
    SkipReason,
    run_failure_sensor,
    sensor,
)

from etl_pipelines.resources import LedgerResource, PostGISResource
from libs import postgis

_ACTIVE = {DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
           DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING}


#: A schema whose run this instance does not know may belong to another Dagster instance
#: sharing the database (a developer's demo next to a test session): leave it this long.
UNKNOWN_RUN_GRACE_SECONDS = 6 * 3600


@sensor(minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
        description="Drops etl_run_* schemas whose run has finished, or that belong to no run "
        "of this instance and are older than 6 hours.")
def postgis_schema_janitor(
    context: SensorEvaluationContext, postgis_db: PostGISResource
) -> SkipReason:
    dropped = []
    with postgis_db.connect(autocommit=True) as conn:
        for schema, age in postgis.list_run_schemas(conn).items():
            run_id = postgis.run_id_of_schema(schema)
            run = context.instance.get_run_by_id(run_id) if run_id else None
            if run is not None and run.status in _ACTIVE:
                continue
            if run is None and age is not None and age < UNKNOWN_RUN_GRACE_SECONDS:
                continue
            postgis.drop_schema(conn, schema)
            dropped.append(schema)
            context.log.info(f"dropped orphan schema {schema} (run {run_id}: "
                             f"{run.status.value if run else 'unknown to this instance'})")
    return SkipReason(f"dropped {len(dropped)} orphan schema(s): {dropped}" if dropped
                      else "no orphan run schema")


@run_failure_sensor(default_status=DefaultSensorStatus.RUNNING,
                    description="Marks failed runs as FAILURE in the ledger.")
def ledger_run_failure_sensor(context: RunFailureSensorContext, ledger: LedgerResource) -> None:
    run = context.dagster_run
    ledger.ledger.record_run(run.run_id, status="FAILURE", batch_id=run.tags.get("batch_id"),
                             error=context.failure_event.message)
