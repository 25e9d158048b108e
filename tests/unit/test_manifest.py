import json
from pathlib import Path

import jsonschema
import pytest

from libs.errors import ManifestError
from libs.manifest import batch_folder, manifest_json_schema, parse_manifest
from libs.sample_batch import write_sample_batch

SCHEMA_FILE = Path(__file__).parents[2] / "schemas" / "manifest.schema.json"


@pytest.fixture
def sample(tmp_path) -> dict:
    return write_sample_batch(tmp_path, "b-001", n_points=10)


def test_published_schema_equals_the_model():
    published = json.loads(SCHEMA_FILE.read_text())
    assert published == manifest_json_schema(), (
        "schemas/manifest.schema.json is stale: regenerate it with "
        "`python -m libs.manifest > schemas/manifest.schema.json`"
    )


def test_sample_manifest_is_valid_for_model_and_json_schema(sample):
    manifest = parse_manifest(json.dumps(sample).encode(), "b-001/manifest.json")
    assert manifest.layers == ["points", "countries"]
    jsonschema.validate(sample, json.loads(SCHEMA_FILE.read_text()))


def test_every_problem_is_listed_with_its_field(sample):
    bad = dict(sample)
    bad["batch_id"] = "../etc"
    bad["target_crs"] = "EPSG:999999"
    bad["files"] = [dict(sample["files"][0], path="/abs/points.fgb", format="xlsx")]
    bad["join"] = dict(sample["join"], right="nope")
    bad["surprise"] = 1
    with pytest.raises(ManifestError) as caught:
        parse_manifest(json.dumps(bad).encode(), "x/manifest.json")
    text = str(caught.value)
    assert "x/manifest.json" in text
    fields = [e.split(":")[0] for e in caught.value.errors]
    for expected in ("batch_id", "target_crs", "files.0.path", "files.0.format", "surprise"):
        assert expected in fields, (expected, caught.value.errors)
    assert "EPSG:999999" in text


def test_join_must_reference_declared_layers(sample):
    bad = dict(sample, join=dict(sample["join"], right="roads"))
    with pytest.raises(ManifestError, match="join.right: layer 'roads' is not fed by any file"):
        parse_manifest(json.dumps(bad).encode(), "k/manifest.json")


def test_sum_needs_a_column(sample):
    join = dict(sample["join"], aggregations=[{"function": "sum", "output": "s"}])
    with pytest.raises(ManifestError, match="sum needs a 'column'"):
        parse_manifest(json.dumps(dict(sample, join=join)).encode(), "k/manifest.json")


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"[]"])
def test_unreadable_manifest_is_one_clear_error(raw):
    with pytest.raises(ManifestError) as caught:
        parse_manifest(raw, "k/manifest.json")
    assert caught.value.errors


def test_paths_resolve_against_the_manifest_folder():
    assert batch_folder("b1/manifest.json") == "b1/"
    assert batch_folder("a/b/manifest.json") == "a/b/"
    assert batch_folder("manifest.json") == ""


def _with_join(sample: dict, **join) -> bytes:
    fields = {k: v for k, v in sample["join"].items() if k not in ("predicate", "aggregations")}
    return json.dumps(dict(sample, join={**fields, **join})).encode()


def test_old_join_defaults_are_kept(sample):
    join = {k: sample["join"][k] for k in ("name", "left", "right")}
    manifest = parse_manifest(json.dumps(dict(sample, join=join)).encode(), "k/manifest.json")
    assert manifest.join.predicate == "intersects" and manifest.join.how == "left"
    assert [(a.function, a.output) for a in manifest.join.aggregations] == [("count", "match_count")]
    assert manifest.join.carry is None and manifest.join.carried_columns() == []


@pytest.mark.parametrize("join", [
    {"predicate": "dwithin", "distance": 2500},
    {"predicate": "nearest", "k": 3, "max_distance": 1e4, "how": "inner",
     "aggregations": [{"function": "mean", "column": "value", "output": "v"}]},
    {"predicate": "nearest", "k": 1, "carry": ["value", {"column": "point_id", "output": "pid"}],
     "distance_column": "metres_away"},
    {"predicate": "within", "carry": []},
])
def test_every_join_kind_is_valid_for_model_and_json_schema(sample, join):
    raw = _with_join(sample, **join)
    parsed = parse_manifest(raw, "k/manifest.json").join
    jsonschema.validate(json.loads(raw), json.loads(SCHEMA_FILE.read_text()))
    if "carry" in join:
        assert parsed.aggregations == []  # carrying replaces the default count


def test_carried_columns_are_prefixed_unless_renamed(sample):
    raw = _with_join(sample, predicate="nearest", k=2,
                     carry=["value", {"column": "point_id", "output": "pid"}])
    join = parse_manifest(raw, "k/manifest.json").join
    assert join.carried_columns() == [("value", "right_value"), ("point_id", "pid")]
    assert join.measures_distance and join.distance_column == "distance"


def test_every_join_problem_is_listed_at_once(sample):
    raw = _with_join(sample, predicate="nearest", distance=10, max_distance=-1, how="outer",
                     carry=["value", {"column": "value", "output": "right_value"}],
                     aggregations=[{"function": "count", "output": "n"}])
    with pytest.raises(ManifestError) as caught:
        parse_manifest(raw, "k/manifest.json")
    errors = caught.value.errors
    expected = {
        "join.distance": "'distance' applies to predicate 'dwithin' only, not 'nearest'; limit "
                         "a nearest join with 'max_distance'",
        "join.k": "predicate 'nearest' needs 'k'",
        "join.max_distance": "greater than 0",
        "join.how": "Input should be 'left' or 'inner'",
        "join.carry": "output 'right_value' is used more than once",
        "join.aggregations": "give either 'aggregations' (one row per left row) or 'carry'",
    }
    for field, message in expected.items():
        assert any(e.startswith(f"{field}:") and message in e for e in errors), (field, errors)
    assert len(errors) == len(expected), errors


@pytest.mark.parametrize("join", [{"predicate": "dwithin"}, {"predicate": "nearest"}])
def test_json_schema_also_requires_distance_or_k(sample, join):
    document = json.loads(_with_join(sample, **join))
    with pytest.raises(jsonschema.ValidationError, match="is a required property"):
        jsonschema.validate(document, json.loads(SCHEMA_FILE.read_text()))


@pytest.mark.parametrize(("join", "field", "message"), [
    ({"predicate": "dwithin"}, "join.distance", "predicate 'dwithin' needs 'distance' (metres, > 0)"),
    ({"predicate": "dwithin", "distance": 0}, "join.distance", "greater than 0"),
    ({"predicate": "nearest", "k": 0}, "join.k", "greater than or equal to 1"),
    ({"predicate": "intersects", "k": 2}, "join.k", "'k' applies to predicate 'nearest' only"),
    ({"predicate": "dwithin", "distance": 5, "max_distance": 9}, "join.max_distance",
     "'max_distance' applies to predicate 'nearest' only, not 'dwithin'"),
    ({"carry": ["value"], "aggregations": [{"function": "count", "output": "n"}]},
     "join.aggregations", "give either 'aggregations' (one row per left row) or 'carry'"),
    ({"aggregations": []}, "join.aggregations", "needs at least one aggregation, or give 'carry'"),
    ({"carry": ["Value"]}, "join.carry.0.name", "should match pattern"),
    ({"carry": ["v" * 60]}, "join.carry", "longer than 63 characters; rename it with"),
    ({"predicate": "nearest", "k": 1, "carry": ["value"], "distance_column": "right_value"},
     "join.distance_column", "'right_value' is also the output of a carried column"),
    ({"predicate": "buffer"}, "join.predicate", "'dwithin' or 'nearest'"),
])
def test_join_problem_names_its_field(sample, join, field, message):
    with pytest.raises(ManifestError) as caught:
        parse_manifest(_with_join(sample, **join), "k/manifest.json")
    assert any(e.startswith(f"{field}:") and message in e for e in caught.value.errors), \
        caught.value.errors


@pytest.mark.parametrize("crs", ["EPSG:2263", "EPSG:4978"])
def test_distance_join_needs_a_crs_in_metres(sample, crs):
    raw = json.dumps(dict(json.loads(_with_join(sample, predicate="dwithin", distance=100)),
                          target_crs=crs)).encode()
    with pytest.raises(ManifestError, match=r"join.predicate: 'dwithin' measures distances in "
                                            rf"metres, but target_crs '{crs}' \(.*\) is"):
        parse_manifest(raw, "k/manifest.json")


@pytest.mark.parametrize("crs", ["EPSG:4326", "EPSG:32631", "EPSG:8857"])
def test_distance_join_accepts_geographic_and_metre_crs(sample, crs):
    raw = json.dumps(dict(json.loads(_with_join(sample, predicate="nearest", k=1)),
                          target_crs=crs)).encode()
    assert parse_manifest(raw, "k/manifest.json").target_crs == crs


def test_foot_crs_is_listed_with_field_errors(sample):
    raw = json.dumps(dict(json.loads(_with_join(sample, predicate="dwithin")),
                          target_crs="EPSG:2263")).encode()
    with pytest.raises(ManifestError) as caught:
        parse_manifest(raw, "k/manifest.json")
    fields = [e.split(":")[0] for e in caught.value.errors]
    assert fields == ["join.distance", "join.predicate"], caught.value.errors


@pytest.mark.parametrize(("raw", "reason"), [
    (b"[" * 200_000, "nesting deeper than 32 levels"),
    (b'{"a": ' * 20_000, "nesting deeper than 32 levels"),
    (b'{"batch_id": "b-\xff\xfe"}', "not valid UTF-8: byte 0xff at offset 16"),
    (b'{"batch_id": ', "not valid JSON at line 1 column 14"),
], ids=["brackets", "objects", "utf-8", "truncated"])
def test_poison_bytes_are_one_manifest_error_never_a_crash(raw, reason):
    with pytest.raises(ManifestError) as caught:
        parse_manifest(raw, "k/manifest.json")
    [error] = caught.value.errors
    assert error.startswith(reason)


def test_brackets_inside_strings_do_not_count_as_nesting(sample):
    sample["batch_id"] = "b-001"
    deep_text = json.dumps(dict(sample, note="[" * 100 + '\\"{' * 100))
    with pytest.raises(ManifestError) as caught:  # 'note' is not a manifest field
        parse_manifest(deep_text.encode(), "k/manifest.json")
    assert [e for e in caught.value.errors if e.startswith("note:")]
    assert not [e for e in caught.value.errors if "nesting" in e]


def test_nesting_up_to_the_limit_is_parsed(sample):
    nested: object = "x"
    for _ in range(31):  # 31 levels of lists inside the top-level object: 32 in all
        nested = [nested]
    with pytest.raises(ManifestError) as caught:
        parse_manifest(json.dumps(dict(sample, note=nested)).encode(), "k/manifest.json")
    assert caught.value.errors == ["note: Extra inputs are not permitted"]


def test_a_layer_named_like_another_layers_rejects_is_refused(sample):
    """Layer 'points' has a rejects dataset 'points_rejects': a layer of that name would be
    published into the same lake folder."""
    clash = dict(sample, files=[*sample["files"],
                                dict(sample["files"][0], path="more.fgb", layer="points_rejects")])
    with pytest.raises(ManifestError) as caught:
        parse_manifest(json.dumps(clash).encode(), "b-001/manifest.json")
    assert any("files: layer 'points_rejects' clashes with the lake dataset of the rejected "
               "rows of layer 'points'; rename layer 'points_rejects'" in e
               for e in caught.value.errors), caught.value.errors


@pytest.mark.parametrize(("name", "message"), [
    ("points", "join.name: 'points' clashes with a layer of the same name"),
    ("countries_rejects", "join.name: 'countries_rejects' clashes with the lake dataset of the "
                          "rejected rows of layer 'countries'; choose another join name"),
    ("_batches", "join.name: '_batches' is reserved in the lake"),
])
def test_a_join_named_like_a_lake_dataset_is_refused(sample, name, message):
    with pytest.raises(ManifestError) as caught:
        parse_manifest(_with_join(sample, name=name), "b-001/manifest.json")
    assert any(message in e for e in caught.value.errors), caught.value.errors


def test_a_layer_whose_name_only_contains_rejects_is_accepted(sample):
    """Only the exact '<layer>_rejects' of a declared layer clashes."""
    fine = dict(sample, files=[*sample["files"],
                               dict(sample["files"][0], path="more.fgb", layer="roads_rejects")])
    manifest = parse_manifest(json.dumps(fine).encode(), "b-001/manifest.json")
    assert "roads_rejects" in manifest.layers


def test_a_split_layer_is_named_by_its_families_in_join_and_recipes(sample):
    """geometry_families 'split' makes '<layer>_points' etc. known, and the layer's own name
    unknown; clashes, disagreeing files and too long names are listed."""
    files = [dict(sample["files"][0], layer="feats", geometry_families="split"),
             sample["files"][1]]
    join = dict(sample["join"], left="countries", right="feats_points")
    doc = dict(sample, files=files, join=join, recipes={"feats_polygons": [{"step": "force_2d"}]})
    manifest = parse_manifest(json.dumps(doc).encode(), "k/manifest.json")
    assert manifest.layers == ["feats_points", "feats_lines", "feats_polygons", "countries"]
    jsonschema.validate(doc, json.loads(SCHEMA_FILE.read_text()))
    with pytest.raises(ManifestError, match="join.right: layer 'feats' is not fed by any file"):
        parse_manifest(json.dumps(dict(doc, join=dict(join, right="feats"))).encode(), "k/m")
    clash = [*files, dict(sample["files"][0], path="b.fgb", layer="feats_lines")]
    with pytest.raises(ManifestError, match="layer 'feats_lines' is declared, and is also one"):
        parse_manifest(json.dumps(dict(doc, files=clash)).encode(), "k/m")
    mixed = [*files, dict(sample["files"][0], path="b.fgb", layer="feats")]
    with pytest.raises(ManifestError, match=r"files of layer 'feats' differ in geometry_families "
                                            r"\(\['mixed', 'split'\]\)"):
        parse_manifest(json.dumps(dict(doc, files=mixed)).encode(), "k/m")
    long_name = "x" * 60
    long_files = [dict(files[0], layer=long_name), files[1]]
    with pytest.raises(ManifestError, match=f"layer '{long_name}_points' .* longer than 63"):
        parse_manifest(json.dumps(dict(doc, files=long_files, recipes={})).encode(), "k/m")


# --- issue 27: no join, several joins ---------------------------------------------------------

def _parse(document: dict):
    return parse_manifest(json.dumps(document).encode(), "j/manifest.json")


def test_a_batch_without_a_join_is_valid_for_model_and_json_schema(sample):
    single = {k: v for k, v in sample.items() if k != "join"}
    single["files"] = sample["files"][:1]
    manifest = _parse(single)
    assert manifest.spatial_joins == [] and manifest.layers == ["points"]
    jsonschema.validate(single, json.loads(SCHEMA_FILE.read_text()))
    # stored (the batch plan, the ledger) and read back
    assert type(manifest).model_validate_json(manifest.model_dump_json()) == manifest


def test_several_joins_are_run_in_order_and_the_single_form_is_one_of_them(sample):
    second = {"name": "nearest_country", "left": "points", "right": "countries",
              "predicate": "nearest", "k": 1, "carry": ["name"]}
    several = {k: v for k, v in sample.items() if k != "join"}
    several["joins"] = [sample["join"], second]
    manifest = _parse(several)
    assert [j.name for j in manifest.spatial_joins] == ["points_per_country", "nearest_country"]
    jsonschema.validate(several, json.loads(SCHEMA_FILE.read_text()))
    assert [j.name for j in _parse(sample).spatial_joins] == ["points_per_country"]


def test_joins_are_checked_each_where_it_is_declared(sample):
    several = {k: v for k, v in sample.items() if k != "join"}
    several["joins"] = [sample["join"], dict(sample["join"], right="roads"),
                        dict(sample["join"], name="points_rejects", left="points",
                             right="countries")]
    several["join"] = sample["join"]
    with pytest.raises(ManifestError) as caught:
        _parse(several)
    text = str(caught.value)
    for expected in (
            "join, joins: give 'join' (one join) or 'joins' (a list), not both",
            "joins[1].right: layer 'roads' is not fed by any file; expected one of "
            "['countries', 'points']",
            "joins[2].name: 'points_rejects' clashes with the lake dataset of the rejected rows "
            "of layer 'points'",
            "joins: name 'points_per_country' is used by more than one join"):
        assert expected in text, (expected, text)


def test_left_columns_must_be_a_non_empty_list(sample):
    with pytest.raises(ManifestError, match="joins.0.left_columns: List should have at least 1"):
        _parse({**{k: v for k, v in sample.items() if k != "join"},
                "joins": [dict(sample["join"], left_columns=[])]})
