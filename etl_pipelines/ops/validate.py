"""First op: re-read and validate the manifest, check the landed files, open the run's ledger
entry, and hold the batch id to one run: a run neither the manifest sensor requested nor a
re-execution of the batch's run needs the override tag once the batch has a claim or run."""

from dagster import Config, Failure, MetadataValue, OpExecutionContext, Out, op
from pydantic import Field

from etl_pipelines.resources import InputLimitsResource, LedgerResource, ObjectStoreResource
from etl_pipelines.types import BatchPlan
from libs.errors import InputDataError
from libs.ledger import CLAIM_TOKEN_TAG, OVERRIDE_CLAIM_TAG, BatchAlreadyClaimed, Ledger, RunStart
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
                     run_id=context.run_id)
    etag = next((o.etag for o in store.list(bucket, config.manifest_key)
                 if o.key == config.manifest_key), "")
    _start_run(context, ledger.ledger, manifest.batch_id, config.manifest_key, etag)
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


def _start_run(context: OpExecutionContext, book: Ledger, batch_id: str, manifest_key: str,
               etag: str) -> None:
    # A re-execution is told by the run's root/parent run id, which Dagster sets and a
    # launchpad user cannot (unlike tags, which the launchpad lets anyone type).
    run, tags = context.run, context.run.tags
    override = (tags.get(OVERRIDE_CLAIM_TAG) or "").strip() or None
    try:
        start = book.start_run(batch_id=batch_id, run_id=context.run_id,
                               manifest_key=manifest_key, etag=etag,
                               claim_token=tags.get(CLAIM_TOKEN_TAG),
                               reexecution_of=run.root_run_id or run.parent_run_id,
                               override=override)
    except BatchAlreadyClaimed as exc:
        raise Failure(description=str(exc)) from None
    if start is RunStart.OVERRIDE:
        context.log.warning(f"batch {batch_id!r} already had a claim or run: processing it again "
                            f"because of the run tag {OVERRIDE_CLAIM_TAG}={override!r} "
                            "(recorded in the ledger's batches.overrides)")
        book.record_run(context.run_id, override_claim=override)
