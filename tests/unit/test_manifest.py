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
