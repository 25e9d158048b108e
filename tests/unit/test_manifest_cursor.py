"""The manifest sensor's cursor: every version it reads, its listing position, its size bound."""

import json

import pytest

from etl_pipelines.sensors.discovery import (
    CURSOR_BOUND_BYTES,
    CURSOR_VERSION,
    SWEEP_PAGE,
    Position,
    next_position,
    read_cursor,
    read_position,
    write_cursor,
)
from etl_pipelines.sensors.manifests import MAX_RECENT
from libs.object_store import ObjectInfo


def _objects(*keys: str) -> list[ObjectInfo]:
    return [ObjectInfo(key, 1, "e") for key in keys]


@pytest.mark.parametrize("raw", [
    json.dumps({"version": 1, "processed": {"a/manifest.json": "1", "b/manifest.json": "2"}}),
    json.dumps({"version": 2, "processed": {"a/manifest.json": "1", "b/manifest.json": "2"}}),
])
def test_older_cursors_keep_their_keys_and_have_no_position(raw):
    assert read_cursor(raw) == {"a/manifest.json": "1", "b/manifest.json": "2"}
    # no position: the next tick lists the whole landing zone once, as those versions did
    assert read_position(raw) == Position(after=None, sweep="")


def test_a_fresh_cursor_lists_everything_once():
    assert read_cursor(None) == {} and read_position(None) == Position()


def test_version_3_round_trips_keys_in_age_order_and_the_position():
    processed = {"z/manifest.json": "1", "a/manifest.json": "2"}
    raw = write_cursor(processed, Position(after="m/x.fgb", sweep="c/y.fgb"))
    assert json.loads(raw)["version"] == CURSOR_VERSION == 3
    assert list(read_cursor(raw)) == ["z/manifest.json", "a/manifest.json"]
    assert read_position(raw) == Position(after="m/x.fgb", sweep="c/y.fgb")


def test_an_unknown_version_is_refused_naming_it():
    with pytest.raises(ValueError, match="version 4 is not 3"):
        read_cursor(json.dumps({"version": 4, "processed": {}}))


def test_the_tail_moves_past_what_was_listed_but_not_past_a_manifest_left_unlooked():
    fresh = _objects("k/a.fgb", "k/manifest.json", "l/manifest.json", "m/b.fgb")
    assert next_position(Position("j", ""), fresh, [], set(), SWEEP_PAGE).after == "m/b.fgb"
    held = next_position(Position("j", ""), fresh, [], {"l/manifest.json"}, SWEEP_PAGE)
    assert held.after == "k/manifest.json"
    first = next_position(Position("j", ""), fresh, [], {"k/manifest.json"}, SWEEP_PAGE)
    assert first.after == "k/a.fgb"
    assert next_position(Position("j", ""), _objects("k/manifest.json"), [],
                         {"k/manifest.json"}, SWEEP_PAGE).after == "j"  # nothing passed: stays
    assert next_position(Position("j", ""), [], [], set(), SWEEP_PAGE).after == "j"


def test_the_sweep_goes_on_page_by_page_and_starts_over_at_the_end():
    full = _objects(*[f"k{i:05d}" for i in range(800)])
    assert next_position(Position("z", ""), [], full, set(), 800).sweep == full[-1].key
    assert next_position(Position("z", "k"), [], full[:3], set(), 800).sweep == ""  # the end
    assert next_position(Position("z", "k"), [], full, set(), 801).sweep == ""  # short of asked
    # a short page with a manifest left unlooked does not start over: it resumes before it
    assert next_position(Position("z", "a"), [], full[:3], {full[1].key},
                         800).sweep == full[0].key


def test_a_full_listing_sets_the_tail_and_starts_the_sweep():
    listed = _objects("a/manifest.json", "b/x", "c/manifest.json")
    assert next_position(Position(), listed, [], set(), 0) == Position(after="c/manifest.json")
    assert next_position(Position(), listed, [], {"c/manifest.json"}, 0) == Position(after="b/x")
    assert next_position(Position(), [], [], set(), 0) == Position(after="")


def test_cursor_stays_under_its_documented_bound_with_the_longest_keys():
    # S3 keys are at most 1,024 UTF-8 bytes; 4-byte characters are the worst case for JSON
    # escaping, which write_cursor avoids
    def key(i: int) -> str:
        return f"{i:06d}/" + "😀" * ((1024 - 7 - len("/manifest.json")) // 4) + "/manifest.json"

    assert len(key(0).encode()) <= 1024
    etag = "0" * 32 + "-10000"  # a multipart ETag
    processed = {key(i): etag for i in range(MAX_RECENT)}
    raw = write_cursor(processed, Position(after=key(MAX_RECENT), sweep=key(MAX_RECENT + 1)))
    assert len(raw.encode()) < CURSOR_BOUND_BYTES, len(raw.encode())
    assert read_cursor(raw) == processed
