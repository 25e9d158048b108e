"""The ingestion job: validate → shard → transform (Ray) → load + join (PostGIS) → publish."""

from dagster import job

from etl_pipelines.ops.load_join import load_and_join
from etl_pipelines.ops.publish import publish_batch
from etl_pipelines.ops.shard import shard_batch
from etl_pipelines.ops.transform import transform_chunks
from etl_pipelines.ops.validate import validate_batch
from run_health.executor import HEARTBEAT_JOB_TAGS, heartbeat_in_process_executor


# In-process execution: the parallel work runs on Ray and in PostGIS, and the steps hand
# each other small descriptions, so a process per step would only add start-up time
# (seconds per step for the geospatial imports) and one Ray driver connection per step. The
# run worker heartbeats, so run monitoring fails a run lost with its process within a minute
# (docs/run-lifecycle.md).
@job(executor_def=heartbeat_in_process_executor,
     tags={"pipeline": "spatial-etl", **HEARTBEAT_JOB_TAGS},
     description="Ingest one landed batch into the data lake (one run per batch_id).")
def ingest_batch():
    plan = validate_batch()
    sharded = shard_batch(plan)
    transformed = transform_chunks(plan, sharded)
    joined = load_and_join(plan, transformed)
    publish_batch(plan, transformed, joined)
