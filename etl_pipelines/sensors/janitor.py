"""Janitors: drop PostGIS schemas that outlived their run; record failed runs in the ledger."""

from dagster import (
    DefaultSensorStatus,
    RunFailureSensorContext,
    SensorEvaluationContext,
    SkipReason,
    run_failure_sensor,
    sensor,
)

from etl_pipelines.resources import LedgerResource, PostGISResource
from libs import postgis
from libs.ledger import run_failure_cause


@sensor(minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
        description="Drops etl_run_* schemas whose creating run process is gone.")
def postgis_schema_janitor(
    context: SensorEvaluationContext, postgis_db: PostGISResource
) -> SkipReason:
    """A run holds an advisory lock on its schema for as long as its process lives, so a free
    lock means the run finished without cleaning up or was killed: whatever Dagster instance
    it belonged to and whatever status that instance still shows, the schema is an orphan."""
    dropped = []
    with postgis_db.connect(autocommit=True) as conn:
        for schema in postgis.list_run_schemas(conn):
            if postgis.schema_in_use(conn, schema):
                continue
            run_id = postgis.run_id_of_schema(schema)
            run = context.instance.get_run_by_id(run_id) if run_id else None
            postgis.drop_schema(conn, schema)
            dropped.append(schema)
            context.log.info(f"dropped orphan schema {schema} (run {run_id}: "
                             f"{run.status.value if run else 'unknown to this instance'})")
    return SkipReason(f"dropped {len(dropped)} orphan schema(s): {dropped}" if dropped
                      else "no orphan run schema")


@run_failure_sensor(default_status=DefaultSensorStatus.RUNNING,
                    description="Marks failed runs as FAILURE in the ledger.")
def ledger_run_failure_sensor(context: RunFailureSensorContext, ledger: LedgerResource) -> None:
    """Also runs that run monitoring failed (lost process, max runtime exceeded): their process
    could not record anything, so this is where the ledger learns of them, with a cause."""
    run = context.dagster_run
    message = context.failure_event.message
    # A run stopped at its max runtime fails twice (the monitor's event, then its own
    # process's): a later failure without a monitoring cause must not erase the cause.
    cause = run_failure_cause(message)
    ledger.ledger.record_run(run.run_id, status="FAILURE", batch_id=run.tags.get("batch_id"),
                             error=message, **({"cause": cause} if cause else {}))
