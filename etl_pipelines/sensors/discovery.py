"""Where the manifest sensor looks: a listing that resumes, a sweep, and the cursor carrying both.

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

from libs.object_store import ObjectInfo, ObjectStore

CURSOR_VERSION = 3
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


def list_new(store: ObjectStore, bucket: str,
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
