"""The library side of the ops, without services: gathering transform results (counts reconcile
per chunk and per batch, order kept whatever order tasks finish in), the batch's lake
datasets and lineage, and the one module that names every staged and lake key."""

import json

import pytest

from etl_pipelines.types import JoinResults
from libs.descriptors import Chunk, ChunkIndex, LayerChunks, SourceFile, StagedPart, TransformedChunk
from libs.errors import PublishError, ReconciliationError
from libs.lake import batch_datasets, chunk_key, lineage_records, part_key, result_prefix, run_prefix
from libs.lake.keys import (
    completion_key,
    dataset_prefix,
    op_output_key,
    publication_id,
    publication_prefix,
    rejects_dataset,
)
from libs.manifest import Manifest
from libs.transformations import TransformResults

MANIFEST = Manifest.model_validate({
    "manifest_version": 1, "batch_id": "b1", "target_crs": "EPSG:8857",
    "files": [{"path": "p.fgb", "layer": "points", "format": "flatgeobuf", "source_crs": "EPSG:3857"},
              {"path": "c.zip", "layer": "countries", "format": "shapefile_zip",
               "source_crs": "EPSG:4326"}],
    "join": {"name": "per_country", "left": "countries", "right": "points"},
})


def _chunk(stage: str, layer: str, ordinal: int, offset: int, rows: int) -> Chunk:
    return Chunk(key=chunk_key("runs/r1/", stage, layer, ordinal), layer=layer, ordinal=ordinal,
                 row_offset=offset, rows=rows, bbox=(0.0, 0.0, 1.0, 1.0), crs="EPSG:3857",
                 bytes=100 + rows, sha256=f"{layer}{ordinal}".ljust(64, "0"))


def _sharded() -> ChunkIndex:
    sources = [SourceFile(bucket="landing-zone", key="b1/p.fgb", sha256="a" * 64, size=10,
                          layer="points", rows=30),
               SourceFile(bucket="landing-zone", key="b1/c.zip", sha256="b" * 64, size=5,
                          layer="countries", rows=2)]
    return ChunkIndex(batch_id="b1", staging_bucket="etl-staging", prefix="runs/r1/", layers=[
        LayerChunks(layer="points", crs="EPSG:3857",
                    chunks=[_chunk("chunks", "points", 0, 0, 20), _chunk("chunks", "points", 1, 20, 10)]),
        LayerChunks(layer="countries", crs="EPSG:4326", chunks=[_chunk("chunks", "countries", 0, 0, 2)]),
    ], sources=sources, geometry_types={"points": ["Point"], "countries": ["Polygon"]})


def _result(source: Chunk, rejected: int = 0, types=("Point",)) -> TransformedChunk:
    out = _chunk("transformed", source.layer, source.ordinal, source.row_offset, source.rows - rejected)
    rejects = _chunk("rejects", source.layer, source.ordinal, source.row_offset, rejected) \
        if rejected else None
    return TransformedChunk(rows_in=source.rows, chunk=out, rejects=rejects,
                            reject_reasons={"make_valid": rejected} if rejected else {},
                            geometry_types=list(types))


def test_results_in_any_order_give_the_sharded_order_and_reconcile():
    sharded = _sharded()
    results = TransformResults(sharded, "EPSG:8857")
    points, countries = sharded.layers
    results.add(points.chunks[1], _result(points.chunks[1], rejected=3))
    results.add(countries.chunks[0], _result(countries.chunks[0], types=("MultiPolygon",)))
    results.add(points.chunks[0], _result(points.chunks[0]))
    index = results.index()
    assert [(layer.layer, [c.ordinal for c in layer.chunks]) for layer in index.layers] == [
        ("points", [0, 1]), ("countries", [0])]
    assert index.rows == 29 and results.rows_in == 32 and results.rows_rejected == 3
    assert [c.source_rows for c in index.layers[0].chunks] == [20, 10]  # the _row_id spans
    assert [(r.layer, r.rows) for r in index.rejects] == [("points", 3)]
    assert index.geometry_types == {"points": ["Point"], "countries": ["MultiPolygon"]}
    assert results.reject_reasons() == {"points": {"make_valid": 3}, "countries": {}}
    assert index.layers[0].crs == "EPSG:8857" and index.rejects[0].crs == "EPSG:3857"


def test_a_chunk_whose_counts_do_not_add_up_fails_naming_it():
    sharded = _sharded()
    results = TransformResults(sharded, "EPSG:8857")
    source = sharded.layers[0].chunks[1]
    broken = _result(source).model_copy(update={"rows_in": 9})
    with pytest.raises(ReconciliationError, match="layer 'points', chunk 1: 10 rows sharded, 9 read"):
        results.add(source, broken)


def test_a_missing_chunk_fails_the_batch():
    sharded = _sharded()
    results = TransformResults(sharded, "EPSG:8857")
    results.add(sharded.layers[0].chunks[0], _result(sharded.layers[0].chunks[0]))
    with pytest.raises(ReconciliationError, match="3 chunks sharded but 1 transformed"):
        results.index()


def _transformed() -> ChunkIndex:
    sharded = _sharded()
    results = TransformResults(sharded, "EPSG:8857")
    for layer in sharded.layers:
        for chunk in layer.chunks:
            # every row of points chunk 1 rejected: an empty part, counted but not published
            results.add(chunk, _result(chunk, rejected=chunk.rows if chunk.ordinal == 1 else 0))
    return results.index()


def test_batch_datasets_and_lineage():
    transformed = _transformed()
    join_parts = [StagedPart("runs/r1/results/per_country/part-00000.parquet", 2, 50, "c" * 64)]
    datasets, info = batch_datasets(transformed, {"per_country": join_parts}, MANIFEST)
    assert {name: [p.rows for p in parts] for name, parts in datasets.items()} == {
        "points": [20], "countries": [2], "points_rejects": [10], "per_country": [2]}
    assert info["points"]["kind"] == "layer" and info["points_rejects"]["kind"] == "rejects"
    assert info["per_country"]["join"]["right"] == "points"
    completion = {"publication": "r1.abcd0123", "datasets": {
        name: {**info[name], "objects": [{"key": f"{name}/b1/part-0", "sha256": p.sha256,
                                          "rows": p.rows} for p in parts]}
        for name, parts in datasets.items()}}
    records = dict(lineage_records(completion, transformed, MANIFEST, "b1/manifest.json", "r1",
                                   lambda key: f"s3://data-lake/{key}"))
    points = records["s3://data-lake/points/b1/part-0"]
    assert [i["key"] for i in points["inputs"]] == ["b1/p.fgb"]
    assert points["recipe"] == [s.model_dump() for s in MANIFEST.recipe_for("points")]
    joined = records["s3://data-lake/per_country/b1/part-0"]
    assert [i["key"] for i in joined["inputs"]] == ["b1/p.fgb", "b1/c.zip"]
    assert joined["recipe"] is None and joined["run_id"] == "r1"
    assert joined["join"]["name"] == "per_country" and points["join"] is None
    # readers select the lineage of the publication the completion manifest names
    assert {r["publication"] for r in records.values()} == {"r1.abcd0123"}


def test_a_join_named_like_a_rejects_dataset_is_not_published_over_it():
    """The manifest refuses the clash; this backstop covers names only known after reading
    the files (a multi-layer file's own layer names)."""
    join_parts = [StagedPart("runs/r1/results/x/part-00000.parquet", 2, 50, "c" * 64)]
    with pytest.raises(PublishError, match="lake dataset 'points_rejects' would hold both "
                       "the result of join 'points_rejects' and another dataset"):
        batch_datasets(_transformed(), {"points_rejects": join_parts}, MANIFEST)


def test_every_key_comes_from_one_module():
    prefix = run_prefix("r1")
    assert prefix == "runs/r1/"
    assert chunk_key(prefix, "transformed", "points", 7) == "runs/r1/transformed/points/chunk-00007.parquet"
    with pytest.raises(ValueError, match="stage must be one of"):
        chunk_key(prefix, "exported", "points", 0)
    assert part_key(result_prefix(prefix, "j"), 2) == "runs/r1/results/j/part-00002.parquet"
    assert dataset_prefix("points", "b1") == "points/b1/"
    first, again = publication_id("r1"), publication_id("r1")
    assert first.startswith("r1.") and first != again, "every publishing attempt has its own"
    assert part_key(publication_prefix("points", "b1", first), 0) == \
        f"points/b1/{first}/part-00000.parquet"
    assert completion_key("b1") == "_batches/b1.json"
    assert rejects_dataset("points") == "points_rejects"
    assert op_output_key("dagster-io", ["r1", "shard_batch", "result"]) == \
        "dagster-io/r1/shard_batch/result.json"


def test_join_results_read_the_single_join_output_stored_before_several_joins():
    """A re-execution of a run from before issue 27 reads its stored load_and_join output."""
    part = {"staging_key": "runs/r1/results/j/part-00000.parquet", "rows": 2, "bytes": 50,
            "sha256": "c" * 64}
    old = {"name": "j", "rows": 2, "parts": [part], "columns": ["n", "geometry"],
           "crs": "EPSG:8857"}
    results = JoinResults.model_validate_json(json.dumps(old))
    assert [(j.name, j.rows) for j in results.joins] == [("j", 2)]
    assert JoinResults.model_validate_json(results.model_dump_json()) == results
    assert JoinResults.model_validate_json("{}").joins == []
