"""The ingestion job: validate → shard → transform (Ray) → load + join (PostGIS) → publish."""

from dagster import in_process_executor, job

from etl_pipelines.ops.load_join import load_and_join
from etl_pipelines.ops.publish import publish_batch
from etl_pipelines.ops.shard import shard_batch
from etl_pipelines.ops.transform import transform_chunks
from etl_pipelines.ops.validate import validate_batch


# In-process execution: the parallel work runs on Ray and in PostGIS, and the steps hand
# each other small descriptions, so a process per step would only add start-up time
# (seconds per step for the geospatial imports) and one Ray driver connection per step.
@job(executor_def=in_process_executor, tags={"pipeline": "spatial-etl"},
     description="Ingest one landed batch into the data lake (one run per batch_id).")
def ingest_batch():
    plan = validate_batch()
    sharded = shard_batch(plan)
    transformed = transform_chunks(plan, sharded)
    joined = load_and_join(plan, transformed)
    publish_batch(plan, transformed, joined)
