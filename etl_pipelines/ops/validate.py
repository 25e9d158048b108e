"""First op: re-read and validate the manifest, check the landed files, open the run's ledger
entry, and hold the batch id to one run: a run neither the manifest sensor requested nor a
re-execution of the batch's run needs the override tag once the batch has a claim or run.

It pins what it read: the manifest's ETag (which must be the one the sensor's claim holds:
a manifest replaced after the claim fails here, saying so) and every declared file's ETag
and size go into the plan, which every later op and a re-execution read, and into the
ledger's batch; a later validate of the batch (not an override) must find the same."""

from dataclasses import asdict

from dagster import Config, Failure, MetadataValue, OpExecutionContext, Out, op
from pydantic import Field

from etl_pipelines.resources import InputLimitsResource, LedgerResource, ObjectStoreResource
from etl_pipelines.types import BatchPlan, PinnedObject
from libs.errors import InputDataError, PinnedVersionChanged
from libs.ledger import (
    CLAIM_TOKEN_TAG,
    OVERRIDE_CLAIM_TAG,
    BatchAlreadyClaimed,
    Ledger,
    RunStart,
    reexecution_hint,
)
from libs.manifest import Manifest, batch_folder, parse_manifest
from libs.object_store import ObjectInfo, ObjectStore


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
    """Read the manifest again (the sensor's view may be stale), check every file is there,
    and pin the versions read: the plan and the ledger's batch record them."""
    store, bucket, book = object_store.store, object_store.landing_bucket, ledger.ledger
    limits, key = input_limits.manifest, config.manifest_key
    head = store.stat(bucket, key)
    if head is None:
        raise InputDataError(f"manifest s3://{bucket}/{key} is gone; it was there when the run "
                             "was requested: land the batch again under a new batch_id")
    manifest = parse_manifest(store.get_bytes(bucket, key, limits.max_bytes + 1, pin=head),
                              key, limits)
    if manifest.batch_id != config.batch_id:
        raise InputDataError(
            f"manifest {key!r} now says batch_id {manifest.batch_id!r} but the run "
            f"was started for {config.batch_id!r}; batch ids are immutable, land a new manifest"
        )
    folder = batch_folder(key)
    objects = _landed_versions(store, bucket, folder, manifest, ledger.run_url(context.run_id))
    _start_run(context, book, manifest.batch_id, key, head.etag)
    _pin(context, book, f"s3://{bucket}/", manifest.batch_id, [head, *objects])
    book.record_run(context.run_id, batch_id=manifest.batch_id, manifest_key=key,
                    status="STARTED", job=context.job_name)
    context.add_output_metadata({
        "batch_id": manifest.batch_id,
        "files": len(manifest.files),
        "layers": MetadataValue.json(manifest.layers),
        "target_crs": manifest.target_crs,
        "manifest": MetadataValue.url(f"s3://{bucket}/{key}"),
        "manifest_etag": head.etag,
    })
    return BatchPlan(manifest=manifest, manifest_key=key, folder=folder, run_id=context.run_id,
                     manifest_version=_pinned(head), pinned=tuple(map(_pinned, objects)))


def _pinned(info: ObjectInfo) -> PinnedObject:
    return PinnedObject(key=info.key, etag=info.etag, size=info.size)


def _landed_versions(store: ObjectStore, bucket: str, folder: str, manifest: Manifest,
                     run_url: str) -> list[ObjectInfo]:
    """Every declared file's current version (HEAD), or an error listing the missing ones
    (nothing is pinned yet: a re-execution, even from this failure, pins what it finds)."""
    found = {f.path: store.stat(bucket, folder + f.path) for f in manifest.files}
    missing = [path for path, info in found.items() if info is None]
    if missing:
        raise InputDataError(
            f"batch {manifest.batch_id!r}: files listed in the manifest are not in "
            f"s3://{bucket}/{folder}: {missing}; land them (a data team lands its files before "
            f"the manifest).\n{reexecution_hint(run_url, all_steps=False)}"
        )
    return [info for info in found.values() if info is not None]


def _pin(context: OpExecutionContext, book: Ledger, where: str, batch_id: str,
         versions: list[ObjectInfo]) -> None:
    """Record the versions validated; the batch's pins, once recorded, hold for every later
    run of it (a validate re-executed after a failure, say) except an override's."""
    ours = {"manifest": asdict(versions[0]), "objects": [asdict(o) for o in versions[1:]]}
    if (context.run.tags.get(OVERRIDE_CLAIM_TAG) or "").strip():
        book.repin_versions(batch_id, context.run_id, ours)
        return
    held = book.pin_versions(batch_id, context.run_id, ours)
    now = {o["key"]: o for o in [ours["manifest"], *ours["objects"]]}
    changed = []
    for pin in [held.get("manifest", {}), *held.get("objects", [])]:
        current = now.get(pin.get("key"))
        if current is None or (current["etag"], current["size"]) != (pin["etag"], pin["size"]):
            changed.append(str(PinnedVersionChanged(
                f"{where}{pin['key']}", (pin["etag"], pin["size"]),
                (current["etag"], current["size"]) if current else None)))
    if changed:
        raise Failure(description=f"batch {batch_id!r}: its landed objects are not the "
                      f"versions run {held.get('by_run')} validated and pinned:\n" +
                      "\n".join(changed))


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
