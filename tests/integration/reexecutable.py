"""The ingest job as a reconstructable target, for tests that use Dagster re-execution."""

from etl_pipelines.definitions import defs


def ingest_batch_job():
    return defs.resolve_job_def("ingest_batch")
