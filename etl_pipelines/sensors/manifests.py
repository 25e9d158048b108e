"""The manifest sensor: one run per batch, each manifest version considered exactly once.

A tick never stops on one manifest: a bad one (size, UTF-8, JSON, nesting, schema) is
recorded in the ledger's ``manifests`` as ``invalid`` with the reason and the tick goes on; a
failed read is recorded ``unreadable`` and tried again by the sweep; if the ledger write fails,
the manifest stays out of the cursor for a later tick (a ledger gone mid-tick ends the tick).
``batches`` makes ``batch_id`` single-use (another key: ``duplicate_batch``; the claiming key
replaced after its run started: ``refused``); ``run_key = batch_id`` guards it in Dagster.

Exactly once under crashes (claimants, stale claims: docs/run-lifecycle.md): a claim names
this Dagster instance and tick; another instance's claim is a duplicate, not cursored.

The ledger is the memory of what was seen; the cursor maps recently processed keys to their
ETag, oldest first, and keeps the listing's ``position``. Past MAX_RECENT entries, the oldest
settled ones (refused, or accepted with a run started) leave the map; a listed version not in
it is looked up in the ledger.

Listing and cursor position: ``discovery`` (docs/manifest-discovery.md).
"""

import time
import uuid

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from pymongo.errors import ConnectionFailure, PyMongoError

from etl_pipelines.jobs.ingest import ingest_batch
from etl_pipelines.resources import InputLimitsResource, LedgerResource, ObjectStoreResource
from etl_pipelines.sensors.discovery import (
    list_new,
    next_position,
    read_cursor,
    read_position,
    write_cursor,
)
from libs.errors import ManifestError, PinnedVersionChanged
from libs.ledger import CLAIM_TOKEN_TAG, Claim, Claimant, Ledger
from libs.manifest import MANIFEST_FILENAME, ManifestLimits, parse_manifest
from libs.object_store import ObjectInfo, ObjectStore
from libs.retry import ServiceUnavailable

MAX_MANIFESTS_PER_TICK = 50
#: Settled entries kept in the cursor (the ledger remembers the rest).
MAX_RECENT = 500

#: This instance's unstarted claims older than this with no run in its run storage are
#: requested again (a run request is stored within seconds of its tick).
STALE_CLAIM_SECONDS = 60
#: Key of this Dagster instance's claimant id in its run storage's key-value table.
INSTANCE_ID_KEY = "spatial-etl/claimant-instance-id"
#: Dagster's run tag of a sensor's run key.
RUN_KEY_TAG = "dagster/run_key"


class Unreadable(ManifestError):
    """The manifest object could not be read: recorded, but retried when the sweep lists it
    again (a blip must not refuse a batch for good)."""


def _read(store: ObjectStore, bucket: str, obj: ObjectInfo, limits: ManifestLimits):
    """The parsed manifest, or ManifestError naming what is wrong with this object."""
    # the listing's size is checked before the object is read (and the read stops past the
    # limit, should the object have grown since the listing)
    too_big = limits.size_problem(obj.size)
    if too_big:
        raise ManifestError(obj.key, [too_big])
    try:
        # the listed version exactly: the claim records its ETag
        raw = store.get_bytes(bucket, obj.key, max_bytes=limits.max_bytes, pin=obj)
    except ValueError:
        raise ManifestError(obj.key, [limits.size_problem(limits.max_bytes + 1)]) from None
    except PinnedVersionChanged:
        raise Unreadable(obj.key, [
            f"was replaced while this tick read it (listed ETag {obj.etag!r}); the next tick "
            "reads the new version"]) from None
    except Exception as exc:  # any read failure is this manifest's problem, maybe passing
        raise Unreadable(obj.key, [
            f"could not be read from s3://{bucket}/{obj.key}: {exc!r}; expected a readable "
            "object: the next tick tries again; if this persists, check the object exists "
            "and the pipeline identity may read it"]) from None
    try:
        return parse_manifest(raw, obj.key, limits)
    except ManifestError:
        raise
    except Exception as exc:  # a parser bug must not stop the sensor
        raise ManifestError(obj.key, [f"could not be parsed: {exc!r}"]) from None


def claimant_of(context: SensorEvaluationContext) -> Claimant:
    """This Dagster instance's claimant id (made once, kept in its run storage) and the tick's
    id (the daemon's tick id, the last part of the tick's log key)."""
    storage = context.instance.run_storage
    found = storage.get_cursor_values({INSTANCE_ID_KEY}).get(INSTANCE_ID_KEY)
    if not found:
        storage.set_cursor_values({INSTANCE_ID_KEY: uuid.uuid4().hex})
        found = storage.get_cursor_values({INSTANCE_ID_KEY})[INSTANCE_ID_KEY]
    tick = context.log_key[-1] if context.log_key else f"at {time.time():.3f}"
    return Claimant(instance=found, tick=str(tick))


def _request(batch_id: str, manifest_key: str, token: str,
             run_tags: dict[str, str]) -> RunRequest:
    return RunRequest(
        run_key=batch_id,
        run_config={"ops": {"validate_batch": {"config": {
            "manifest_key": manifest_key, "batch_id": batch_id}}}},
        tags={"batch_id": batch_id, "manifest_key": manifest_key, CLAIM_TOKEN_TAG: token,
              **run_tags})


def _consider(context: SensorEvaluationContext, book: Ledger, obj: ObjectInfo,
              manifest, run_tags: dict[str, str], claimant: Claimant) -> RunRequest | Claim | None:
    """Claim the manifest's batch and record the outcome (a run request carries ``run_tags``
    too); a ledger error propagates. ``Claim.DUPLICATE`` when another instance holds it."""
    batch_id = manifest.batch_id
    claim = book.claim_batch(batch_id=batch_id, manifest_key=obj.key, etag=obj.etag,
                             manifest=manifest.model_dump(mode="json"), claimant=claimant)
    if claim is Claim.CLAIMED:
        book.record_manifest(manifest_key=obj.key, etag=obj.etag, status="accepted",
                             batch_id=batch_id, run_key=batch_id)
        return _request(batch_id, obj.key, book.claim_token(batch_id), run_tags)
    holder = book.batch(batch_id) or {}
    runs = holder.get("run_ids") or []
    if claim is Claim.ALREADY_STARTED:
        # a reset cursor shows us an accepted manifest again: its record stays as is
        context.log.info(f"manifest {obj.key!r}: batch {batch_id!r} already has run(s) {runs}; "
                         "retries go through Dagster re-execution")
        return None
    if claim is Claim.DUPLICATE and holder.get("manifest_key") == obj.key:
        # the manifest's record is the claiming instance's: the attempt goes in the batch
        book.record_duplicate_claim(batch_id, claimant)
        context.log.warning(
            f"manifest {obj.key!r}: batch {batch_id!r} is claimed by another Dagster instance "
            f"sharing the ledger ({holder.get('claimed_by')}, at {holder.get('claimed_at')}); "
            "that instance runs it. Looked at again when the discovery sweep lists it, until "
            "its run starts; taken over if its claim expires unstarted")
        return Claim.DUPLICATE
    if claim is Claim.REFUSED:
        error = (f"batch id {batch_id!r} already claimed by run {', '.join(runs) or '(starting)'} "
                 f"(manifest {obj.key!r} was replaced after its run started); land a new batch "
                 "id, or re-execute that run in Dagster")
    else:
        error = (f"batch_id {batch_id!r} was already claimed by "
                 f"{holder.get('manifest_key')!r}; batch ids are immutable, use a new "
                 "batch_id or re-execute the original run in Dagster")
    book.record_manifest(manifest_key=obj.key, etag=obj.etag, status=claim.value,
                         batch_id=batch_id, errors=[error])
    context.log.warning(f"manifest {obj.key!r}: {error}")
    return None


def _stale_claims(context: SensorEvaluationContext, book: Ledger, claimant: Claimant,
                  run_tags: dict[str, str]) -> list[RunRequest]:
    """Run requests again for this instance's claims that are STALE_CLAIM_SECONDS old, not
    started, and have no run in this instance's run storage."""
    requests = []
    for claim in book.unstarted_claims(claimant.instance, STALE_CLAIM_SECONDS,
                                       limit=MAX_MANIFESTS_PER_TICK):
        batch_id = claim["_id"]
        if context.instance.get_run_ids(
                RunsFilter(tags={RUN_KEY_TAG: batch_id}), limit=1):
            continue
        context.log.warning(f"batch {batch_id!r}: claimed by this instance "
                            f"({claim.get('claimed_by')}) but no run was ever stored; "
                            "requesting it again")
        requests.append(_request(batch_id, claim["manifest_key"], claim["claim_token"], run_tags))
    return requests


def _prune(context: SensorEvaluationContext, book: Ledger, processed: dict[str, str]) -> None:
    """Drop the oldest entries past MAX_RECENT whose ledger record is settled."""
    if len(processed) <= MAX_RECENT:
        return
    oldest = list(processed.items())[:len(processed) - MAX_RECENT]
    try:
        settled = book.settled_manifests(oldest)
    except (PyMongoError, ServiceUnavailable) as exc:  # kept for now; the next tick prunes
        context.log.warning(f"cursor not pruned, the ledger did not answer: {exc!r}")
        return
    for key, etag in settled:
        if processed.get(key) == etag:
            del processed[key]


@sensor(job=ingest_batch, minimum_interval_seconds=10,
        default_status=DefaultSensorStatus.RUNNING,
        description="Starts one ingest_batch run per new manifest.json in the landing zone.")
def manifest_sensor(
    context: SensorEvaluationContext, object_store: ObjectStoreResource, ledger: LedgerResource,
    input_limits: InputLimitsResource,
) -> SensorResult | SkipReason:
    processed = read_cursor(context.cursor)
    position = read_position(context.cursor)
    store = object_store.store
    bucket = object_store.landing_bucket
    try:
        fresh, swept, asked = list_new(store, bucket, position)
        listed = [o for o in {o.key: o for o in fresh + swept}.values()
                  if o.key.rsplit("/", 1)[-1] == MANIFEST_FILENAME
                  and processed.get(o.key) != o.etag]
    except ServiceUnavailable as exc:  # the store's retry budget spent: nothing to look at
        return SkipReason(f"s3://{bucket} could not be listed ({exc}); the next tick retries")
    book = ledger.ledger
    try:
        settled = book.settled_manifests([(o.key, o.etag) for o in listed])
        claimant = claimant_of(context)
        stale = _stale_claims(context, book, claimant, input_limits.max_runtime_tags)
    except (PyMongoError, ServiceUnavailable) as exc:  # its retry budget spent
        # without the ledger nothing can be claimed or recorded: the cursor stays as it is
        return SkipReason(f"the ledger did not answer ({exc!r}); no manifest was looked at, "
                          "the next tick retries")
    new = [o for o in listed if (o.key, o.etag) not in settled]
    if not new and not stale:
        skip = SkipReason(f"no new manifest in s3://{bucket} ({len(processed)} in the cursor)")
        moved = write_cursor(processed, next_position(position, fresh, swept, set(), asked))
        # the listing moved on (or the sweep went on): the position is kept even on a skip
        return skip if moved == context.cursor else SensorResult(skip_reason=skip, cursor=moved)
    requests: list[RunRequest] = []
    unlooked = new[MAX_MANIFESTS_PER_TICK:]  # the positions stay before these
    for index, obj in enumerate(new[:MAX_MANIFESTS_PER_TICK]):
        try:
            try:
                manifest = _read(store, bucket, obj, input_limits.manifest)
            except Unreadable as exc:
                book.record_manifest(manifest_key=obj.key, etag=obj.etag, status="unreadable",
                                     batch_id=None, errors=exc.errors)
                context.log.warning(str(exc))
                continue  # not in the cursor, not settled in the ledger: the sweep retries it
            except ManifestError as exc:
                book.record_manifest(manifest_key=obj.key, etag=obj.etag, status="invalid",
                                     batch_id=None, errors=exc.errors)
                context.log.warning(str(exc))
            else:
                request = _consider(context, book, obj, manifest, input_limits.max_runtime_tags,
                                    claimant)
                if request is Claim.DUPLICATE:
                    continue  # another instance's claim: not cursored, looked at again
                if request is not None:
                    requests.append(request)
        except (ConnectionFailure, ServiceUnavailable) as exc:
            # the ledger (or the store) went away mid-tick: every other manifest would wait out the same
            # timeout, so they are all left (uncursored) for the next tick
            context.log.error(f"the ledger did not answer at manifest {obj.key!r} ({exc!r}); "
                              "it and the manifests after it are left for the next tick")
            unlooked = new[index:]
            break
        except Exception as exc:  # e.g. a ledger write refused: the sweep retries it
            context.log.error(f"manifest {obj.key!r} left for a later tick: {exc!r}")
            continue
        processed.pop(obj.key, None)  # re-inserted: the newest entry
        processed[obj.key] = obj.etag
    requests += [r for r in stale if r.run_key not in {q.run_key for q in requests}]
    _prune(context, book, processed)
    position = next_position(position, fresh, swept, {o.key for o in unlooked}, asked)
    return SensorResult(run_requests=requests, cursor=write_cursor(processed, position))
