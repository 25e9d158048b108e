"""Declared input limits: the vertex counter, the limits' validation, and each limit refusing
what is over it (manifest size and files, read batch bytes, vertices per geometry)."""

import json

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely

from libs.errors import InputDataError, ManifestError
from libs.manifest import DataFile, ManifestLimits, bad_geometry_policy, parse_manifest
from libs.manifest.recipe import MakeValid, Reproject
from libs.sample_batch import write_sample_batch
from libs.sharding import ShardLimits, plan_layers, shard_layer
from libs.sharding.readers import split_batch
from libs.sharding.wkb import count_vertices, over_vertex_limit

GEOMETRIES = [
    shapely.Point(1, 2),
    shapely.LineString([(0, 0), (1, 1), (2, 0)]),
    shapely.Polygon([(0, 0), (4, 0), (4, 4), (0, 4)], [[(1, 1), (2, 1), (2, 2), (1, 1)]]),
    shapely.MultiPolygon([shapely.box(0, 0, 1, 1), shapely.box(2, 2, 3, 3)]),
    None,
    shapely.Polygon(),
]


def wkb_array(geoms, **options) -> pa.Array:
    return pa.array([None if g is None else shapely.to_wkb(g, **options) for g in geoms],
                    pa.binary())


def expected_counts(geoms) -> list[int]:
    return [0 if g is None else int(shapely.get_num_coordinates(g)) for g in geoms]


def test_count_vertices_walks_plain_wkb_like_geos_counts():
    assert count_vertices(wkb_array(GEOMETRIES)).tolist() == expected_counts(GEOMETRIES)


def test_count_vertices_parses_what_the_walk_does_not_take():
    geoms = [shapely.Point(1, 2, 3), shapely.LineString([(0, 0, 1), (1, 1, 1)]), None]
    big_endian = wkb_array(GEOMETRIES[:4], byte_order=0)
    assert count_vertices(wkb_array(geoms)).tolist() == [1, 2, 0]
    assert count_vertices(big_endian).tolist() == expected_counts(GEOMETRIES[:4])


def test_over_vertex_limit_counts_only_values_long_enough_to_be_over():
    ring = shapely.Point(0, 0).buffer(1, quad_segs=250)  # 1001 vertices
    array = wkb_array([shapely.box(0, 0, 1, 1), ring, None, ring.exterior])
    rows, counts = over_vertex_limit(array, 1000)
    assert rows.tolist() == [1, 3] and counts.tolist() == [1001, 1001]
    rows, counts = over_vertex_limit(array, 1001)
    assert rows.tolist() == [] and counts.tolist() == []


@pytest.mark.parametrize("field", ["read_batch_bytes", "max_file_bytes", "max_vertices",
                                   "read_batch_rows"])
def test_shard_limits_refuse_values_below_one(field):
    with pytest.raises(ValueError, match=f"ShardLimits.{field} must be >= 1, got 0"):
        ShardLimits(**{field: 0})


def test_manifest_limits_refuse_values_below_one():
    with pytest.raises(ValueError, match="ManifestLimits.max_files must be >= 1"):
        ManifestLimits(max_files=0)
    with pytest.raises(ValueError, match="ManifestLimits.max_bytes must be >= 1"):
        ManifestLimits(max_bytes=-5)


def test_batch_rows_follow_the_bytes_per_row():
    limits = ShardLimits(read_batch_rows=1000, read_batch_bytes=10_000)
    assert limits.batch_rows_for(1) == 1000  # the rows bound
    assert limits.batch_rows_for(100) == 100  # the bytes bound
    assert limits.batch_rows_for(50_000) == 1  # a row larger than the bound: one at a time
    assert limits.batch_rows_for(0) == 1000


def test_split_batch_slices_only_batches_over_the_bytes_bound():
    batch = pa.record_batch({"v": pa.array(np.arange(1000, dtype=np.int64))})  # 8000 bytes
    whole = list(split_batch(batch, ShardLimits(read_batch_bytes=8000)))
    assert [b.num_rows for b in whole] == [1000]
    parts = list(split_batch(batch, ShardLimits(read_batch_bytes=3000)))
    assert [b.num_rows for b in parts] == [375, 375, 250]
    assert pa.concat_arrays([b.column(0) for b in parts]).equals(batch.column(0))


def sample_manifest(tmp_path, files: int = 2) -> dict:
    manifest = write_sample_batch(tmp_path, "limits", n_points=10)
    extra = [{"path": f"more-{i}.fgb", "layer": "points", "format": "flatgeobuf"}
             for i in range(files - 2)]
    manifest["files"] += extra
    return manifest


def test_a_manifest_with_too_many_files_is_refused_naming_the_field_and_limit(tmp_path):
    raw = json.dumps(sample_manifest(tmp_path, files=4)).encode()
    assert len(parse_manifest(raw, "b/manifest.json", ManifestLimits(max_files=4)).files) == 4
    with pytest.raises(ManifestError) as caught:
        parse_manifest(raw, "b/manifest.json", ManifestLimits(max_files=3))
    assert caught.value.errors == [
        "files: 4 files listed; the limit is 3 per manifest: split the batch into several "
        "manifests"]


def test_a_manifest_over_the_byte_limit_is_refused_before_parsing(tmp_path):
    raw = json.dumps(sample_manifest(tmp_path)).encode()
    with pytest.raises(ManifestError) as caught:
        parse_manifest(raw, "b/manifest.json", ManifestLimits(max_bytes=100))
    assert caught.value.errors == [f"the manifest is {len(raw):,} bytes; the limit is 100 bytes: "
                                   "split the batch into several manifests"]


def test_the_bad_geometry_policy_follows_make_valid():
    assert bad_geometry_policy([Reproject(), MakeValid(policy="fail")]) == "fail"
    assert bad_geometry_policy([Reproject(), MakeValid(policy="reject")]) == "reject"
    assert bad_geometry_policy([Reproject(), MakeValid(policy="repair")]) == "reject"
    assert bad_geometry_policy([Reproject()]) == "reject"


@pytest.fixture
def heavy_layer(tmp_path):
    """Three polygons; the second (row 2, 1-based) has 2,001 vertices."""
    heavy = shapely.Point(5, 5).buffer(1, quad_segs=500)
    frame = gpd.GeoDataFrame({"name": ["a", "heavy", "c"]},
                             geometry=[shapely.box(0, 0, 1, 1), heavy, shapely.box(2, 2, 3, 3)],
                             crs="EPSG:3857")
    path = tmp_path / "shapes.parquet"
    frame.to_parquet(path)
    return path


def shard_with(tmp_path, path, policy: str, max_vertices: int):
    limits = ShardLimits(max_vertices=max_vertices)
    plan = plan_layers([(path, DataFile(path=path.name, layer="shapes", format="geoparquet"))],
                       limits)
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    objects = {}

    def sink(ordinal, data):
        objects[ordinal] = data
        return f"chunk-{ordinal}"

    return shard_layer("shapes", plan["shapes"], sink, scratch_dir=scratch, limits=limits,
                       vertex_policy=policy), objects


def test_a_geometry_over_the_vertex_limit_is_set_apart_with_its_row_and_reason(
        tmp_path, heavy_layer):
    sharded, objects = shard_with(tmp_path, heavy_layer, "reject", 2000)
    assert sharded.rows == 2
    assert sharded.rows_per_source == {str(heavy_layer): 3}
    [(step, reason, attributes)] = sharded.rejected
    assert step == "vertex_limit"
    assert reason == ("file 'shapes.parquet' (layer 'shapes'), row 2: the geometry has 2,001 "
                      "vertices; the limit is 2,000")
    assert json.loads(attributes) == {"name": "heavy"}
    kept = pa.concat_tables([pq.read_table(pa.BufferReader(d)) for d in objects.values()])
    assert sorted(kept.column("name").to_pylist()) == ["a", "c"]


def test_a_geometry_over_the_vertex_limit_fails_the_layer_under_policy_fail(tmp_path,
                                                                            heavy_layer):
    with pytest.raises(InputDataError) as caught:
        shard_with(tmp_path, heavy_layer, "fail", 2000)
    assert str(caught.value).startswith(
        "file 'shapes.parquet' (layer 'shapes'), row 2: the geometry has 2,001 vertices; the "
        "limit is 2,000 (recipe policy 'fail')")
    sharded, _ = shard_with(tmp_path, heavy_layer, "fail", 2001)
    assert sharded.rows == 3 and sharded.rejected == []
