"""Row-level problems are rejects (issue 27): each bad row set apart with its file, 1-based
row (a CSV's data line) and reason while the good rows go on; a layer with more bad rows than
its max_reject_fraction fails listing the first problems by reason; several unusable files
are listed in one error."""

import json

import pyarrow as pa
import pytest
import shapely

from libs.descriptors import Chunk, ChunkIndex, LayerChunks
from libs.errors import InputDataError
from libs.ledger import reexecution_hint, step_failure_cause
from libs.manifest import DataFile, Manifest
from libs.manifest.rejects import breach_message, grouped_problems, reason_kind
from libs.sharding.inputs import plan_layers
from libs.sharding.shard import shard_layer
from libs.sharding.wkb import geometry_problems
from libs.transformations import check_reject_fractions


def _shard(tmp_path, text: str, csv: dict, encoding_bytes: bytes | None = None,
           **data_file_fields):
    path = tmp_path / "sites.csv"
    if encoding_bytes is not None:
        path.write_bytes(encoding_bytes)
    else:
        path.write_text(text)
    data_file = DataFile(path="sites.csv", layer="sites", format="csv", source_crs="EPSG:4326",
                         csv=csv, **data_file_fields)
    plan = plan_layers([(path, data_file)])
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return shard_layer("sites", plan["sites"], lambda ordinal, data: f"chunk-{ordinal}",
                       scratch_dir=scratch)


def test_bad_csv_rows_are_rejects_naming_their_data_line_and_the_good_rows_go_on(tmp_path):
    text = ("id,wkt,name\n"
            "1,POINT (1 2),good\n"
            "2,POINT (1,unparsable\n"
            "3,POINT (nan 1),not finite\n"
            "4,LINESTRING (1 1),one point\n"
            "5,,no geometry\n"
            "6,POINT (3 4),good\n")
    sharded = _shard(tmp_path, text, {"wkt_column": "wkt"})
    assert sharded.rows == 3  # data lines 1, 5 (no geometry is fine) and 6
    rejected = [(step, reason.split(": ", 1)[0], json.loads(values)["id"])
                for step, reason, values in sharded.rejected]
    # the id column is typed (CSV types are inferred): the rejects keep the typed values
    assert rejected == [("read", "file 'sites.csv' (layer 'sites'), data line 2", 2),
                        ("read", "file 'sites.csv' (layer 'sites'), data line 3", 3),
                        ("read", "file 'sites.csv' (layer 'sites'), data line 4", 4)]
    reasons = [reason for _, reason, _ in sharded.rejected]
    assert "holds 'POINT (1', which is not valid WKT" in reasons[0]
    assert "coordinates are NaN or infinite" in reasons[1]
    assert "the geometry cannot be read (point array must contain 0 or >1 elements)" in reasons[2]


def test_text_not_valid_utf8_in_one_row_is_a_reject_keeping_what_could_be_read(tmp_path):
    data = b"id,x,y,name\n1,1,2,Zurich\n2,3,4," + "Zürich".encode("cp1252") + b"\n"
    sharded = _shard(tmp_path, "", {"x_column": "x", "y_column": "y"}, encoding_bytes=data)
    assert sharded.rows == 1
    [(step, reason, values)] = sharded.rejected
    assert step == "read"
    assert reason.startswith("file 'sites.csv' (layer 'sites'), data line 2, column 'name': text "
                             "b'Z\\xfcrich' is not valid in encoding UTF-8")
    assert json.loads(values) == {"id": 2, "name": "Z\ufffdrich"}


def test_a_layer_whose_every_row_is_bad_fails_listing_the_problems(tmp_path):
    with pytest.raises(InputDataError) as caught:
        _shard(tmp_path, "id,x,y\n1,nan,1\n2,1,inf\n", {"x_column": "x", "y_column": "y"})
    message = str(caught.value)
    assert message.startswith("layer 'sites': all 2 rows were rejected as bad data")
    assert "data line 1: x/y ('x', 'y') are (nan, 1.0)" in message
    assert "data line 2: x/y ('x', 'y') are (1.0, inf)" in message


def test_geometry_problems_name_rows_geos_refuses_and_leave_other_types_alone():
    fine = shapely.to_wkb(shapely.box(0, 0, 1, 1))
    nan_line = shapely.to_wkb(shapely.LineString([(0, 0), (float("nan"), 1)]))
    curve = bytes.fromhex("01080000000300000000000000000000000000000000000000000000000000f03f"
                          "000000000000f03f0000000000000040000000000000f03f")
    found = geometry_problems(pa.array([fine, nan_line, b"\x01\x03", None, curve], pa.binary()))
    assert list(found) == [1, 2]
    assert found[1] == "coordinates are NaN or infinite; expected finite numbers"
    assert found[2].startswith("the geometry cannot be read (")


def test_a_breach_lists_the_first_problems_grouped_by_reason():
    problems = [("read", f"file 'a.csv' (layer 's'), data line {n}: column 'wkt' holds "
                 f"'P{n}', which is not valid WKT") for n in range(1, 30)]
    problems.insert(3, ("vertex_limit", "file 'a.csv' (layer 's'), data line 99: the geometry "
                        "has 2,001 vertices; the limit is 2,000"))
    assert breach_message("s", 10, 100, 0.1, problems) is None  # at the limit is allowed
    message = breach_message("s", 30, 100, 0.1, problems)
    assert message.startswith("layer 's': 30 of 100 rows were rejected as bad data (30.0%), "
                              "more than its max_reject_fraction 0.1 allows. The first problems")
    listing = grouped_problems(problems)
    assert listing.count("    - ") == 20
    assert listing.splitlines()[0] == "  read: column … holds …, which is not valid WKT (19 listed)"
    assert "  vertex_limit: the geometry has … vertices; the limit is … (1 listed)" in listing
    assert reason_kind("file 'x' (layer 'y'), row 3, column 'n': text b'Z\\xfc' is not valid in "
                       "encoding UTF-8") == "text … is not valid in encoding UTF-8"


def _manifest(**extra) -> dict:
    return {"manifest_version": 1, "batch_id": "b1", "target_crs": "EPSG:4326",
            "files": [{"path": "a.fgb", "layer": "a", "format": "flatgeobuf"},
                      {"path": "b.fgb", "layer": "b", "format": "flatgeobuf"}],
            "join": {"left": "a", "right": "b", "predicate": "intersects", "name": "ab"},
            **extra}


def test_max_reject_fraction_is_per_layer_with_a_default():
    manifest = Manifest.model_validate(_manifest(max_reject_fraction={"a": 0.5, "*": 0.2}))
    assert manifest.max_reject_fraction_for("a") == 0.5
    assert manifest.max_reject_fraction_for("b") == 0.2
    assert Manifest.model_validate(_manifest()).max_reject_fraction_for("a") == 0.1
    with pytest.raises(ValueError, match="max_reject_fraction.c: no file feeds layer 'c'"):
        Manifest.model_validate(_manifest(max_reject_fraction={"c": 0.5}))
    with pytest.raises(ValueError, match="less than or equal to 1"):
        Manifest.model_validate(_manifest(max_reject_fraction={"a": 1.5}))


def test_several_unusable_files_are_listed_in_one_error(tmp_path):
    files = []
    for name in ("a.fgb", "b.fgb"):
        (tmp_path / name).write_text("not a flatgeobuf")
        files.append((tmp_path / name, DataFile(path=name, layer=name[0], format="flatgeobuf")))
    with pytest.raises(InputDataError) as caught:
        plan_layers(files)
    lines = str(caught.value).splitlines()
    assert lines[0] == "2 problems with the landed files:"
    assert lines[1].startswith("  - file 'a.fgb' (layer 'a'): declared flatgeobuf")
    assert lines[2].startswith("  - file 'b.fgb' (layer 'b'): declared flatgeobuf")


def test_the_ledger_cause_is_the_steps_own_error_and_the_hint_links_the_run():
    assert step_failure_cause("shard_batch", "libs.errors.InputDataError: file 'a.csv': bad\n") == {
        "failed_step": "shard_batch", "cause": "InputDataError: file 'a.csv': bad"}
    hint = reexecution_hint("http://ui/runs/r1", all_steps=True)
    assert "land the corrected file(s) at the same key(s)" in hint
    assert "(http://ui/runs/r1) and choose Re-execute > All steps" in hint


def test_rows_named_after_rejects_keep_their_numbers(tmp_path):
    text = "id,wkt\n1,POINT (1 2)\n2,POINT (oops\n3,\"POLYGON ((0 0, 1 0, 1 1, 0 0))\"\n"
    with pytest.raises(InputDataError, match=r"mixes Point \(row 1\) and Polygon \(row 3\)"):
        _shard(tmp_path, text, {"wkt_column": "wkt"}, geometry_families="one")


def _index(rows: int):
    def chunk(key, n):
        return Chunk(key=key, layer="a", ordinal=0, row_offset=0, rows=n, bbox=None,
                     crs="EPSG:4326", bytes=1, sha256="0")

    return ChunkIndex(batch_id="b", staging_bucket="s", prefix="p", sources=[],
                      layers=[LayerChunks(layer="a", crs="EPSG:4326", chunks=[chunk("c", rows)])],
                      rejects=[LayerChunks(layer="a", crs="EPSG:4326", chunks=[chunk("r", 3)])])


def test_the_transform_check_counts_bad_rows_not_selections_and_reads_only_a_breach():
    read = []

    def problems_of(chunk):
        read.append(chunk.key)
        return [("filter", "value < 60"), ("make_valid", "file 'a' (layer 'a'), row 2: bad")]

    # 3 invalid of 61 rows (50 filtered away do count as rows, not as problems): within 0.1
    check_reject_fractions(_index(8), {"a": {"make_valid": 3, "filter": 50}}, lambda _: 0.1,
                           problems_of)
    check_reject_fractions(_index(8), {"a": {"filter": 50}}, lambda _: 0.0, problems_of)
    assert read == []
    with pytest.raises(InputDataError) as caught:
        check_reject_fractions(_index(8), {"a": {"make_valid": 3}}, lambda _: 0.1, problems_of)
    assert read == ["r"]
    assert str(caught.value).startswith("layer 'a': 3 of 11 rows were rejected as bad data")
    assert "value < 60" not in str(caught.value)
    assert "  make_valid: bad (1 listed)" in str(caught.value)


def test_a_wrongly_declared_encoding_lists_the_undecodable_lines_in_one_pass(tmp_path):
    path = tmp_path / "sites.csv"
    path.write_bytes(b"id,name,wkt\n1,Z\xfcrich,POINT (1 2)\n2,ok,POINT (1 2)\n3,Caf\xe9,POINT (1 2)\n")
    data_file = DataFile(path="sites.csv", layer="sites", format="csv", encoding="ascii",
                         source_crs="EPSG:4326", csv={"wkt_column": "wkt"})
    plan = plan_layers([(path, data_file)])
    with pytest.raises(InputDataError) as caught:
        shard_layer("sites", plan["sites"], lambda o, d: "k", scratch_dir=tmp_path)
    assert str(caught.value).startswith(
        "file 'sites.csv' (layer 'sites'): byte 15 (line 2) cannot be decoded as the declared "
        "encoding 'ascii' (ordinal not in range(128)); also at line(s) 4; declare")
