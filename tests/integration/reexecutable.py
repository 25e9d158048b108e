"""The ingest job as a reconstructable target, for tests that use Dagster re-execution."""

from dagster import Definitions, EnvVar

from etl_pipelines.definitions import build_resources, defs
from etl_pipelines.jobs.ingest import ingest_batch
from etl_pipelines.resources import LedgerResource


def ingest_batch_job():
    return defs.resolve_job_def("ingest_batch")


def ingest_batch_job_with_a_short_ledger_budget():
    """The same job whose ledger gives up on MongoDB after ~3 s instead of 30 s: a test of
    MongoDB unreachable fails the run in seconds."""
    resources = {**build_resources(), "ledger": LedgerResource(
        connection_string=EnvVar("MONGO_CONNECTION_STRING"), timeout_ms=1000,
        retry_deadline_seconds=3.0)}
    return Definitions(jobs=[ingest_batch], resources=resources).resolve_job_def("ingest_batch")
