"""First op: re-read and validate the manifest, check the landed files, open the run's ledger entry."""

from dagster import Config, MetadataValue, OpExecutionContext, Out, op
from pydantic import Field

from etl_pipelines.resources import InputLimitsResource, LedgerResource, ObjectStoreResource
from etl_pipelines.types import BatchPlan
from libs.errors import InputDataError
from libs.lake import run_prefix
from libs.manifest import batch_folder, parse_manifest


class BatchConfig(Config):
    """Which manifest this run processes (set by the manifest sensor)."""

    manifest_key: str = Field(description="key of the manifest in the landing bucket")
    batch_id: str = Field(description="batch id the sensor read from the manifest")


@op(out=Out(BatchPlan), tags={"stage": "validate"})
def validate_batch(
    context: OpExecutionContext,
    config: BatchConfig,
    object_store: ObjectStoreResource,
    ledger: LedgerResource,
    input_limits: InputLimitsResource,
) -> BatchPlan:
    """Read the manifest again (the sensor's view may be stale), check every file is there."""
    store = object_store.store
    bucket = object_store.landing_bucket
    limits = input_limits.manifest
    manifest = parse_manifest(store.get_bytes(bucket, config.manifest_key, limits.max_bytes + 1),
                              config.manifest_key, limits)
    if manifest.batch_id != config.batch_id:
        raise InputDataError(
            f"manifest {config.manifest_key!r} now says batch_id {manifest.batch_id!r} but the run "
            f"was started for {config.batch_id!r}; batch ids are immutable, land a new manifest"
        )
    folder = batch_folder(config.manifest_key)
    missing = [f.path for f in manifest.files if not store.exists(bucket, folder + f.path)]
    if missing:
        raise InputDataError(
            f"batch {manifest.batch_id!r}: files listed in the manifest are not in "
            f"s3://{bucket}/{folder}: {missing}; land them before the manifest"
        )
    plan = BatchPlan(manifest=manifest, manifest_key=config.manifest_key, folder=folder,
                     staging_prefix=run_prefix(context.run_id), run_id=context.run_id)
    ledger.ledger.attach_run(manifest.batch_id, context.run_id)
    ledger.ledger.record_run(context.run_id, batch_id=manifest.batch_id,
                             manifest_key=config.manifest_key, status="STARTED",
                             job=context.job_name)
    context.add_output_metadata({
        "batch_id": manifest.batch_id,
        "files": len(manifest.files),
        "layers": MetadataValue.json(manifest.layers),
        "target_crs": manifest.target_crs,
        "manifest": MetadataValue.url(f"s3://{bucket}/{config.manifest_key}"),
    })
    return plan
