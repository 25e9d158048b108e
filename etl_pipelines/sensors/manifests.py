"""The manifest sensor: one run per batch, each manifest version considered exactly once.

The cursor (JSON, versioned) maps every manifest key it has processed to the ETag it saw,
valid or not, so nothing is retried automatically; retries go through Dagster
re-execution. The ledger's ``batches`` collection makes ``batch_id`` single-use across
keys: a manifest that reuses a claimed batch id is recorded as a duplicate and gets no
run, and ``run_key = batch_id`` guards the same on Dagster's side.
"""

import json

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from etl_pipelines.jobs.ingest import ingest_batch
from etl_pipelines.resources import InputLimitsResource, LedgerResource, ObjectStoreResource
from libs.errors import ManifestError
from libs.ledger import CLAIM_TOKEN_TAG, Claim
from libs.manifest import MANIFEST_FILENAME, parse_manifest

CURSOR_VERSION = 1
MAX_MANIFESTS_PER_TICK = 50


def read_cursor(raw: str | None) -> dict[str, str]:
    if not raw:
        return {}
    data = json.loads(raw)
    if data.get("version") != CURSOR_VERSION:
        raise ValueError(f"manifest sensor cursor version {data.get('version')!r} is not "
                         f"{CURSOR_VERSION}; reset the cursor deliberately")
    return dict(data["processed"])


def write_cursor(processed: dict[str, str]) -> str:
    return json.dumps({"version": CURSOR_VERSION, "processed": processed}, sort_keys=True)


@sensor(job=ingest_batch, minimum_interval_seconds=10,
        default_status=DefaultSensorStatus.RUNNING,
        description="Starts one ingest_batch run per new manifest.json in the landing zone.")
def manifest_sensor(
    context: SensorEvaluationContext, object_store: ObjectStoreResource, ledger: LedgerResource,
    input_limits: InputLimitsResource,
) -> SensorResult | SkipReason:
    processed = read_cursor(context.cursor)
    store = object_store.store
    bucket = object_store.landing_bucket
    new = [o for o in store.list(bucket)
           if o.key.rsplit("/", 1)[-1] == MANIFEST_FILENAME and processed.get(o.key) != o.etag]
    if not new:
        return SkipReason(f"no new manifest in s3://{bucket} ({len(processed)} processed so far)")
    book = ledger.ledger
    requests: list[RunRequest] = []
    limits = input_limits.manifest
    for obj in new[:MAX_MANIFESTS_PER_TICK]:
        try:
            # the listing's size is checked before the object is read (and the read stops
            # past the limit, should the object have grown since the listing)
            too_big = limits.size_problem(obj.size)
            if too_big:
                raise ManifestError(obj.key, [too_big])
            try:
                raw = store.get_bytes(bucket, obj.key, max_bytes=limits.max_bytes)
            except ValueError:
                raise ManifestError(obj.key, [limits.size_problem(limits.max_bytes + 1)]) from None
            manifest = parse_manifest(raw, obj.key, limits)
        except ManifestError as exc:
            book.record_manifest(manifest_key=obj.key, etag=obj.etag, status="invalid",
                                 batch_id=None, errors=exc.errors)
            context.log.warning(str(exc))
        else:
            batch_id = manifest.batch_id
            claim = book.claim_batch(batch_id=batch_id, manifest_key=obj.key, etag=obj.etag,
                                     manifest=manifest.model_dump(mode="json"))
            if claim is Claim.CLAIMED:
                book.record_manifest(manifest_key=obj.key, etag=obj.etag, status="accepted",
                                     batch_id=batch_id, run_key=batch_id)
                requests.append(RunRequest(
                    run_key=batch_id,
                    run_config={"ops": {"validate_batch": {"config": {
                        "manifest_key": obj.key, "batch_id": batch_id}}}},
                    tags={"batch_id": batch_id, "manifest_key": obj.key,
                          CLAIM_TOKEN_TAG: book.claim_token(batch_id),
                          **input_limits.max_runtime_tags},
                ))
            elif claim is Claim.ALREADY_STARTED:
                # a reset cursor shows us an accepted manifest again: its record stays as is
                runs = (book.batch(batch_id) or {}).get("run_ids")
                context.log.info(f"manifest {obj.key!r}: batch {batch_id!r} already has run(s) "
                                 f"{runs}; retries go through Dagster re-execution")
            else:
                holder = book.batch(batch_id) or {}
                error = (f"batch_id {batch_id!r} was already claimed by "
                         f"{holder.get('manifest_key')!r}; batch ids are immutable, use a new "
                         "batch_id or re-execute the original run in Dagster")
                book.record_manifest(manifest_key=obj.key, etag=obj.etag, status=claim.value,
                                     batch_id=batch_id, errors=[error])
                context.log.warning(f"manifest {obj.key!r}: {error}")
        processed[obj.key] = obj.etag
    return SensorResult(run_requests=requests, cursor=write_cursor(processed))
