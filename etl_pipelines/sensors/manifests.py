"""The manifest sensor: one run per batch, each manifest version considered exactly once.

A tick never stops on one manifest: a bad one (size, UTF-8, JSON, nesting, schema) is
recorded in the ledger's ``manifests`` as ``invalid`` with the reason and the tick goes on; a
failed read is recorded ``unreadable`` and tried again by the sweep; if the ledger write fails,
the manifest stays out of the cursor for a later tick (a ledger gone mid-tick ends the tick).
``batches`` makes ``batch_id`` single-use (another key: ``duplicate_batch``; the claiming key
replaced after its run started: ``refused``); ``run_key = batch_id`` guards it in Dagster.

The ledger is the memory of what was seen; the cursor (JSON, ``version`` 3; versions 1 and 2
are read, without a position) maps recently processed keys to their ETag, oldest first, and
keeps a ``position``. Past MAX_RECENT entries, the oldest settled ones (refused, or accepted
with a run started) leave the map; a listed version not in it is looked up in the ledger.

Discovery (docs/manifest-discovery.md): each tick lists what landed after ``position.after``
(at most TAIL_PAGE keys, S3 start-after) plus one page of a sweep that walks the whole
bucket round and round from ``position.sweep``: a key sorting before ``after`` (keys are
user-chosen) or a replaced manifest is found within ~ceil(objects / SWEEP_PAGE) ticks. A tick
costs what is new plus one page, not the landing zone. Neither position passes a manifest
the tick did not look at. No position (a fresh or older cursor): one full listing (at most
FIRST_PAGE keys, then the tail goes on from there).
Bound: MAX_RECENT settled entries plus the unsettled ones (at most the run queue), each at
most ~1.1 KB (an S3 key is <= 1,024 bytes), plus two keys: under 553 KB, ~36 KB for
typical keys (docs/limits.md).
"""

import json
import random
from dataclasses import dataclass

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from pymongo.errors import ConnectionFailure, PyMongoError

from etl_pipelines.jobs.ingest import ingest_batch
from etl_pipelines.resources import InputLimitsResource, LedgerResource, ObjectStoreResource
from libs.errors import ManifestError
from libs.ledger import CLAIM_TOKEN_TAG, Claim, Ledger
from libs.manifest import MANIFEST_FILENAME, ManifestLimits, parse_manifest
from libs.object_store import ObjectInfo, ObjectStore
from libs.retry import ServiceUnavailable

CURSOR_VERSION = 3
MAX_MANIFESTS_PER_TICK = 50
#: Settled entries kept in the cursor (the ledger remembers the rest).
MAX_RECENT = 500
#: Keys listed past ``position.after`` per tick (a larger burst takes several ticks).
TAIL_PAGE = 10_000
#: Keys the reconciliation sweep lists per tick (one S3 listing request): between 3/4 of it
#: and all of it, at random, so that page boundaries differ from round to round (SeaweedFS
#: resumes after a key that is also a folder, "a" beside "a/b", past everything under it).
SWEEP_PAGE = 1_000
#: The cursor's documented bound (MAX_RECENT settled entries, the longest keys, the position).
CURSOR_BOUND_BYTES = 553_000
#: Keys listed by a tick without a position (~15 s on SeaweedFS: well under Dagster's 60 s
#: sensor timeout, which a whole listing of a larger landing zone would pass every tick).
FIRST_PAGE = 100_000


@dataclass(frozen=True)
class Position:
    """Where the next tick's listings resume: ``after`` (None: list everything once) and the
    sweep's ``sweep`` ("" starts it over from the bucket's first key)."""

    after: str | None = None
    sweep: str = ""


def read_cursor(raw: str | None) -> dict[str, str]:
    """Processed manifest key -> ETag, oldest first (versions 1 and 2 had the same map)."""
    if not raw:
        return {}
    data = json.loads(raw)
    if data.get("version") not in (1, 2, CURSOR_VERSION):
        raise ValueError(f"manifest sensor cursor version {data.get('version')!r} is not "
                         f"{CURSOR_VERSION} (or 1, 2); reset the cursor deliberately")
    return dict(data["processed"])


def read_position(raw: str | None) -> Position:
    """The listing position a cursor carries; none (a fresh, version 1 or 2 cursor) is a full
    listing on the next tick."""
    place = json.loads(raw).get("position") if raw else None
    if not place:
        return Position()
    return Position(after=place.get("after"), sweep=place.get("sweep") or "")


def write_cursor(processed: dict[str, str], position: Position | None = None) -> str:
    # insertion order is age order: no sort_keys
    place = position or Position()
    # ensure_ascii=False: a key of 1,024 UTF-8 bytes stays <= 1,024 characters (escaped, up to 3x)
    return json.dumps({"version": CURSOR_VERSION, "processed": processed,
                       "position": {"after": place.after, "sweep": place.sweep}},
                      ensure_ascii=False)


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
        raw = store.get_bytes(bucket, obj.key, max_bytes=limits.max_bytes)
    except ValueError:
        raise ManifestError(obj.key, [limits.size_problem(limits.max_bytes + 1)]) from None
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


def _consider(context: SensorEvaluationContext, book: Ledger, obj: ObjectInfo,
              manifest, run_tags: dict[str, str]) -> RunRequest | None:
    """Claim the manifest's batch and record the outcome (a run request carries ``run_tags``
    too); a ledger error propagates."""
    batch_id = manifest.batch_id
    claim = book.claim_batch(batch_id=batch_id, manifest_key=obj.key, etag=obj.etag,
                             manifest=manifest.model_dump(mode="json"))
    if claim is Claim.CLAIMED:
        book.record_manifest(manifest_key=obj.key, etag=obj.etag, status="accepted",
                             batch_id=batch_id, run_key=batch_id)
        return RunRequest(
            run_key=batch_id,
            run_config={"ops": {"validate_batch": {"config": {
                "manifest_key": obj.key, "batch_id": batch_id}}}},
            tags={"batch_id": batch_id, "manifest_key": obj.key,
                  CLAIM_TOKEN_TAG: book.claim_token(batch_id), **run_tags})
    holder = book.batch(batch_id) or {}
    runs = holder.get("run_ids") or []
    if claim is Claim.ALREADY_STARTED:
        # a reset cursor shows us an accepted manifest again: its record stays as is
        context.log.info(f"manifest {obj.key!r}: batch {batch_id!r} already has run(s) {runs}; "
                         "retries go through Dagster re-execution")
        return None
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


def _list(store: ObjectStore, bucket: str,
          position: Position) -> tuple[list[ObjectInfo], list[ObjectInfo], int]:
    """What landed past ``position.after``, the sweep's next page and the keys it asked for
    (without a position: the bucket from its first key, FIRST_PAGE keys at most, no sweep)."""
    if position.after is None:
        return store.list_page(bucket, limit=FIRST_PAGE), [], 0
    fresh = store.list_page(bucket, after=position.after, limit=TAIL_PAGE)
    asked = SWEEP_PAGE - random.randrange(SWEEP_PAGE // 4 + 1)
    return fresh, store.list_page(bucket, after=position.sweep, limit=asked), asked


def _advance(start: str, page: list[ObjectInfo], held: set[str]) -> str:
    """Where a listing resumes next: past ``page``, but not past a key in ``held``."""
    last = start
    for obj in page:
        if obj.key in held:
            break
        last = obj.key
    return last


def next_position(position: Position, fresh: list[ObjectInfo], swept: list[ObjectInfo],
                  held: set[str], asked: int) -> Position:
    """Past what this tick listed (``fresh`` after ``position.after``, ``swept`` after
    ``position.sweep``), never past a manifest in ``held`` (not looked at); a sweep page
    shorter than the ``asked`` keys reached the bucket's end: the sweep starts over."""
    after = _advance(position.after or "", fresh, held)
    if position.after is None or (len(swept) < asked and not held & {o.key for o in swept}):
        return Position(after=after, sweep="")  # the sweep went round: from the start again
    return Position(after=after, sweep=_advance(position.sweep, swept, held))


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
        fresh, swept, asked = _list(store, bucket, position)
        listed = [o for o in {o.key: o for o in fresh + swept}.values()
                  if o.key.rsplit("/", 1)[-1] == MANIFEST_FILENAME
                  and processed.get(o.key) != o.etag]
    except ServiceUnavailable as exc:  # the store's retry budget spent: nothing to look at
        return SkipReason(f"s3://{bucket} could not be listed ({exc}); the next tick retries")
    book = ledger.ledger
    try:
        settled = book.settled_manifests([(o.key, o.etag) for o in listed])
    except (PyMongoError, ServiceUnavailable) as exc:  # its retry budget spent
        # without the ledger nothing can be claimed or recorded: the cursor stays as it is
        return SkipReason(f"the ledger did not answer ({exc!r}); no manifest was looked at, "
                          "the next tick retries")
    new = [o for o in listed if (o.key, o.etag) not in settled]
    if not new:
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
                request = _consider(context, book, obj, manifest, input_limits.max_runtime_tags)
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
    _prune(context, book, processed)
    position = next_position(position, fresh, swept, {o.key for o in unlooked}, asked)
    return SensorResult(run_requests=requests, cursor=write_cursor(processed, position))
