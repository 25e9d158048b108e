"""Shard stage: every input format, chunk bounds, Hilbert order, determinism, bad input.

Format variants are generated under ``tmp_path`` from two sources: seeded synthetic points
(``libs.sample_batch.synthetic_points``) and the Natural Earth countries shipped in pyogrio's
wheel. Small cases use inline WKT.
"""

import hashlib
import io
import json
import time
import zipfile
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pyogrio
import pytest
import shapely
from pyproj import CRS

from libs.errors import InputDataError
from libs.manifest import DataFile
from libs.sample_batch import NATURAL_EARTH_DIR, natural_earth_countries_zip, synthetic_points
from libs.sharding import (
    LayerSource,
    ShardLimits,
    hilbert_index,
    normalised_layer_name,
    plan_layers,
    shard_layer,
)
from libs.sharding.collect import SourceStore
from libs.sharding.external_sort import map_in_order_ahead, stable_argsort
from libs.sharding.wkb import geometry_bounds, walked_bounds

PYOGRIO_FIXTURES = NATURAL_EARTH_DIR.parent


class MemorySink:
    def __init__(self):
        self.objects: dict[str, bytes] = {}

    def __call__(self, ordinal: int, data: bytes) -> str:
        key = f"chunk-{ordinal:05d}.parquet"
        self.objects[key] = data
        return key


def shard(tmp_path, files, layer=None, **limits):
    """Plan and shard; returns (ShardedLayer, sink) of ``layer`` (default: the only layer)."""
    plan = plan_layers(files, ShardLimits(**limits))
    name = layer or next(iter(plan))
    sink = MemorySink()
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    result = shard_layer(name, plan[name], sink, scratch_dir=scratch, limits=ShardLimits(**limits))
    return result, sink


def chunk_table(sink, result) -> pa.Table:
    tables = [pq.read_table(io.BytesIO(sink.objects[c.key])) for c in result.chunks.chunks]
    return pa.concat_tables(tables)


def chunk_frame(sink, result) -> gpd.GeoDataFrame:
    frames = [gpd.read_parquet(io.BytesIO(sink.objects[c.key])) for c in result.chunks.chunks]
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=frames[0].crs)


def entry(path: Path, fmt: str, layer="points", **options) -> tuple[Path, DataFile]:
    return path, DataFile(path=path.name, layer=layer, format=fmt, **options)


def zip_folder(folder: Path, out: Path, skip=(), arcnames=None) -> Path:
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for part in sorted(folder.iterdir()):
            if part.suffix not in skip:
                archive.write(part, arcname=(arcnames or {}).get(part.suffix, part.name))
    return out


@pytest.fixture(scope="module")
def points() -> gpd.GeoDataFrame:
    return synthetic_points(600, seed=7).to_crs("EPSG:4326")


def write_variant(frame: gpd.GeoDataFrame, fmt: str, folder: Path) -> tuple[Path, DataFile]:
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "geojson":
        path = folder / "points.geojson"
        pyogrio.write_dataframe(frame, path, driver="GeoJSON")
        return entry(path, "geojson")
    if fmt == "geojsonseq":
        path = folder / "points.geojsonl"
        pyogrio.write_dataframe(frame, path, driver="GeoJSONSeq")
        return entry(path, "geojsonseq")
    if fmt == "gpkg":
        path = folder / "points.gpkg"
        pyogrio.write_dataframe(frame, path, driver="GPKG", layer="pts")
        return entry(path, "gpkg", source_layer="pts")
    if fmt == "flatgeobuf":
        path = folder / "points.fgb"
        pyogrio.write_dataframe(frame, path, driver="FlatGeobuf")
        return entry(path, "flatgeobuf")
    if fmt == "shapefile_zip":
        shp = folder / "shp"
        shp.mkdir()
        pyogrio.write_dataframe(frame, shp / "points.shp")
        return entry(zip_folder(shp, folder / "points.zip"), "shapefile_zip")
    if fmt in ("geoparquet_1.0.0", "geoparquet_1.1.0"):
        path = folder / "points.parquet"
        frame.to_parquet(path, schema_version=fmt.split("_")[1],
                         write_covering_bbox=fmt.endswith("1.1.0"))
        return entry(path, "geoparquet")
    if fmt == "csv_wkt":
        path = folder / "points.csv"
        table = pd.DataFrame(frame.drop(columns="geometry"))
        table["wkt"] = frame.geometry.to_wkt()
        table.to_csv(path, index=False)
        return entry(path, "csv", source_crs="EPSG:4326", csv={"wkt_column": "wkt"})
    if fmt == "csv_xy":
        path = folder / "points.txt"  # not a .csv name: the CSV driver is forced
        table = pd.DataFrame(frame.drop(columns="geometry"))
        table["lon"], table["lat"] = frame.geometry.x, frame.geometry.y
        table.to_csv(path, index=False)
        return entry(path, "csv", source_crs="EPSG:4326", csv={"x_column": "lon", "y_column": "lat"})
    raise AssertionError(fmt)


FORMATS = ["geojson", "geojsonseq", "gpkg", "flatgeobuf", "shapefile_zip", "geoparquet_1.0.0",
           "geoparquet_1.1.0", "csv_wkt", "csv_xy"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_shards_every_row(tmp_path, points, fmt):
    source = write_variant(points, fmt, tmp_path / "in")
    result, sink = shard(tmp_path, [source], chunk_rows=250)
    assert [c.rows for c in result.chunks.chunks] == [250, 250, 100]
    assert result.rows_per_source == {str(source[0]): 600}
    assert result.geometry_types == ["Point"]
    assert CRS.from_user_input(result.chunks.crs).equals(CRS("EPSG:4326"), ignore_axis_order=True)
    frame = chunk_frame(sink, result)
    frame["point_id"] = frame["point_id"].astype("int64")  # CSV attributes stay text
    frame = frame.sort_values("point_id").reset_index(drop=True)
    assert frame["point_id"].tolist() == list(range(600))
    assert set(frame.columns) == {"point_id", "value", "category", "geometry"}
    np.testing.assert_allclose(shapely.get_coordinates(frame.geometry),
                               shapely.get_coordinates(points.geometry), atol=1e-6)
    assert frame["category"].tolist() == points["category"].tolist()


def test_zipped_shapefile_of_natural_earth(tmp_path, monkeypatch):
    monkeypatch.setattr("libs.sharding.wkb.PARSE_BYTES", 20_000)  # parse polygons in several slices...
    monkeypatch.setattr("libs.sharding.wkb.wkb_layout", lambda array: None)  # ...with shapely, not the walk
    zipped = natural_earth_countries_zip(tmp_path / "countries.zip")
    result, sink = shard(tmp_path, [entry(zipped, "shapefile_zip", layer="countries")],
                         chunk_rows=50)
    assert result.rows == 177
    assert result.chunks.crs == "EPSG:4326"
    assert result.geometry_types == ["MultiPolygon", "Polygon"]  # one family: fine
    assert result.schema.names == ["pop_est", "continent", "name", "iso_a3", "gdp_md_est", "geometry"]
    countries = gpd.read_file(NATURAL_EARTH_DIR / "naturalearth_lowres.shp")
    frame = chunk_frame(sink, result).sort_values("name").reset_index(drop=True)
    expected = countries.sort_values("name").reset_index(drop=True)
    assert frame["iso_a3"].tolist() == expected["iso_a3"].tolist()
    assert shapely.equals(frame.geometry.values, expected.geometry.values).all()


def test_chunks_are_bounded_by_rows_and_bytes(tmp_path):
    path = tmp_path / "points.fgb"
    pyogrio.write_dataframe(synthetic_points(3000, seed=1), path, driver="FlatGeobuf")
    result, sink = shard(tmp_path, [entry(path, "flatgeobuf")], chunk_rows=1000, chunk_bytes=40_000)
    chunks = result.chunks.chunks
    assert len(chunks) > 3  # the byte bound, not the row bound, decided
    assert all(c.rows <= 1000 and c.bytes <= 40_000 for c in chunks)
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    assert [c.row_offset for c in chunks] == list(np.cumsum([0] + [c.rows for c in chunks])[:-1])
    assert result.rows == 3000
    for chunk in chunks:
        data = sink.objects[chunk.key]
        assert len(data) == chunk.bytes
        assert hashlib.sha256(data).hexdigest() == chunk.sha256
        assert pq.ParquetFile(io.BytesIO(data)).metadata.num_rows == chunk.rows


def test_a_chunk_over_the_byte_bound_is_split_and_a_huge_row_stands_alone(tmp_path):
    zipped = natural_earth_countries_zip(tmp_path / "countries.zip")
    result, sink = shard(tmp_path, [entry(zipped, "shapefile_zip", layer="countries")],
                         chunk_bytes=12_000)
    chunks = result.chunks.chunks
    assert result.rows == 177
    assert all(c.bytes <= 12_000 or c.rows == 1 for c in chunks)
    assert any(c.rows == 1 and c.bytes > 12_000 for c in chunks)  # e.g. Canada's coastline


def test_zip_of_the_sample_batch_holds_a_whole_shapefile(tmp_path):
    zipped = natural_earth_countries_zip(tmp_path / "c.zip")
    assert {n.rsplit(".", 1)[1] for n in zipfile.ZipFile(zipped).namelist()} >= {
        "shp", "shx", "dbf", "prj", "cpg"}


def test_chunks_are_geoparquet_1_1_whose_metadata_bbox_is_the_index_bbox(tmp_path, points):
    source = write_variant(points.to_crs("EPSG:3857"), "flatgeobuf", tmp_path / "in")
    result, sink = shard(tmp_path, [source], chunk_rows=200)
    for chunk in result.chunks.chunks:
        data = sink.objects[chunk.key]
        parquet = pq.ParquetFile(io.BytesIO(data))
        assert parquet.metadata.row_group(0).column(0).compression == "ZSTD"
        geo = json.loads(parquet.schema_arrow.metadata[b"geo"])
        column = geo["columns"]["geometry"]
        assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
        assert column["encoding"] == "WKB" and column["geometry_types"] == ["Point"]
        assert CRS.from_json_dict(column["crs"]).equals(CRS("EPSG:3857"))
        assert tuple(column["bbox"]) == pytest.approx(chunk.bbox)
        # staging chunks have one reader, the transform, which reads every row: no covering
        assert "covering" not in column and "bbox" not in parquet.schema_arrow.names
        frame = gpd.read_parquet(io.BytesIO(data))
        assert tuple(frame.total_bounds) == pytest.approx(chunk.bbox)
        assert frame.crs.equals(CRS("EPSG:3857"))
    assert result.chunks.crs == "EPSG:3857"


def test_rows_without_a_geometry_come_last_with_a_null_bbox(tmp_path):
    path = tmp_path / "gaps.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"n": 0}, "geometry": None},
        {"type": "Feature", "properties": {"n": 1}, "geometry": {"type": "Point", "coordinates": [1, 1]}},
        {"type": "Feature", "properties": {"n": 2}, "geometry": None},
        {"type": "Feature", "properties": {"n": 3}, "geometry": {"type": "Point", "coordinates": [0, 0]}},
    ]}))
    result, sink = shard(tmp_path, [entry(path, "geojson")])
    table = chunk_table(sink, result)
    assert table.column("n").to_pylist() == [3, 1, 0, 2]  # Hilbert order, then source order
    assert table.column("geometry").is_null().to_pylist() == [False, False, True, True]
    assert result.chunks.chunks[0].bbox == (0.0, 0.0, 1.0, 1.0)


def xy2d(n: int, x: int, y: int) -> int:
    """The classic scalar Hilbert index, as a reference."""
    d, s = 0, n // 2
    while s > 0:
        rx, ry = int(x & s > 0), int(y & s > 0)
        d += s * s * ((3 * rx) ^ ry)
        if ry == 0:
            if rx == 1:
                x, y = n - 1 - x, n - 1 - y
            x, y = y, x
        s //= 2
    return d


def test_hilbert_index_matches_the_classic_algorithm():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 2**32, 300, dtype=np.int64)
    y = rng.integers(0, 2**32, 300, dtype=np.int64)
    keys = hilbert_index(x, y)
    assert keys.dtype == np.uint64
    assert [int(k) for k in keys] == [xy2d(2**32, int(a), int(b)) for a, b in zip(x, y, strict=True)]


def test_hilbert_curve_steps_to_a_neighbour_cell():
    side = 32
    x, y = (a.ravel() for a in np.meshgrid(np.arange(side), np.arange(side)))
    keys = hilbert_index(x, y)
    order = np.argsort(keys)
    assert len(np.unique(keys)) == side * side
    steps = np.abs(np.diff(x[order])) + np.abs(np.diff(y[order]))
    assert (steps == 1).all()


def test_equal_keys_keep_source_order():
    rng = np.random.default_rng(1)
    for _ in range(50):
        keys = rng.integers(0, rng.integers(1, 40), rng.integers(1, 500)).astype(np.uint64)
        keys[rng.random(len(keys)) < 0.2] = np.uint64(2**64 - 1)  # rows without a geometry
        assert (stable_argsort(keys) == np.argsort(keys, kind="stable")).all()


def clustered_points(n: int, seed: int) -> gpd.GeoDataFrame:
    """Points in 12 tight clusters scattered over a large extent, in shuffled order."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-1e6, 1e6, (12, 2))
    which = rng.integers(0, 12, n)
    xy = centres[which] + rng.normal(0, 5e3, (n, 2))
    return gpd.GeoDataFrame({"point_id": np.arange(n)}, geometry=gpd.points_from_xy(xy[:, 0], xy[:, 1]),
                            crs="EPSG:3857")


def _area(box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def _overlapping_pairs(boxes) -> int:
    return sum(1 for i, a in enumerate(boxes) for b in boxes[i + 1:]
               if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


def test_hilbert_order_gives_compact_chunks(tmp_path):
    frame = clustered_points(4000, seed=11)
    path = tmp_path / "clustered.fgb"
    pyogrio.write_dataframe(frame, path, driver="FlatGeobuf")
    result, sink = shard(tmp_path, [entry(path, "flatgeobuf")], chunk_rows=250)
    boxes = [c.bbox for c in result.chunks.chunks]
    unsorted = [tuple(frame.iloc[i:i + 250].total_bounds) for i in range(0, 4000, 250)]
    assert sum(map(_area, boxes)) < 0.05 * sum(map(_area, unsorted))
    pairs = len(boxes) * (len(boxes) - 1) // 2
    assert _overlapping_pairs(boxes) < 0.2 * pairs  # mostly disjoint; a split cluster may touch
    assert _overlapping_pairs(unsorted) == pairs
    out = chunk_frame(sink, result)
    step = np.hypot(np.diff(out.geometry.x), np.diff(out.geometry.y))
    step_in = np.hypot(np.diff(frame.geometry.x), np.diff(frame.geometry.y))
    assert np.median(step) < 0.01 * np.median(step_in)


def test_partition_pass_works_ahead_in_order_and_bounded():
    started: list[int] = []
    rng = np.random.default_rng(3)
    delays = rng.uniform(0, 0.004, 40)

    def work(item: int) -> int:
        started.append(item)
        time.sleep(delays[item])  # later items often finish first
        return item * 10

    def items():
        for item in range(40):
            # never more than `ahead` items handed out and not yet yielded back
            assert item - len(consumed) <= 4
            yield item

    consumed: list[int] = []
    for value in map_in_order_ahead(items(), work, threads=2, ahead=4):
        consumed.append(value)
    assert consumed == [i * 10 for i in range(40)]

    def fails(item: int) -> int:
        if item == 7:
            raise InputDataError("row 7 is broken")
        return item

    with pytest.raises(InputDataError, match="row 7"):
        list(map_in_order_ahead(iter(range(20)), fails, threads=2, ahead=3))


def test_same_input_gives_byte_identical_chunks_in_memory_or_external(tmp_path, monkeypatch):
    # Small enough to exercise the external sort's sampling and bucket flushing.
    monkeypatch.setattr("libs.sharding.collect.SAMPLE_SIZE", 500)
    monkeypatch.setattr("libs.sharding.external_sort.BUCKET_FLUSH_ROWS", 64)
    monkeypatch.setattr("libs.sharding.collect.SEGMENT_BYTES", 20_000)  # several spill files
    frame = clustered_points(3000, seed=5)
    # A pile of identical points: a bucket of one key, which the external sort streams out.
    pile = gpd.GeoDataFrame({"point_id": np.arange(3000, 3600)},
                            geometry=[shapely.Point(0, 0)] * 600, crs="EPSG:3857")
    frame = pd.concat([frame, pile], ignore_index=True)
    path = tmp_path / "points.fgb"
    pyogrio.write_dataframe(frame, path, driver="FlatGeobuf")
    runs = [shard(tmp_path, [entry(path, "flatgeobuf")], chunk_rows=400, **limits)
            for limits in ({}, {}, {"sort_memory_bytes": 40_000, "read_batch_rows": 256})]
    chunk_bytes = [[sink.objects[c.key] for c in result.chunks.chunks] for result, sink in runs]
    assert chunk_bytes[0] == chunk_bytes[1]  # deterministic
    assert chunk_bytes[0] == chunk_bytes[2]  # the external sort gives the same order and cuts
    assert [c.rows for c in runs[2][0].chunks.chunks] == [400] * 9


def test_a_spilled_source_is_read_back_in_order_and_each_file_deleted_once_read(
        tmp_path, monkeypatch):
    monkeypatch.setattr("libs.sharding.collect.SEGMENT_BYTES", 500)
    store = SourceStore(tmp_path / "source-0000.arrows")
    batches = [pa.record_batch({"n": np.arange(i * 100, (i + 1) * 100)}) for i in range(5)]
    store.add(batches[0])
    store.spill()
    for batch in batches[1:]:
        store.add(batch)
    store.close()
    assert len(store.segments) == 5  # 800 bytes a batch: a new file once one holds 500
    assert sorted(tmp_path.iterdir()) == store.segments
    read = store.read()
    assert next(read).equals(batches[0])
    assert next(read).equals(batches[1])  # the first file is gone once the second is read
    assert sorted(tmp_path.iterdir()) == store.segments[1:]
    assert [b.equals(want) for b, want in zip(read, batches[2:], strict=True)] == [True] * 3
    assert list(tmp_path.iterdir()) == []


def test_several_files_feed_one_layer_in_one_order(tmp_path):
    frame = clustered_points(1200, seed=9)
    one = tmp_path / "all.fgb"
    pyogrio.write_dataframe(frame, one, driver="FlatGeobuf")
    halves = []
    for i, part in enumerate((frame.iloc[:500], frame.iloc[500:])):
        path = tmp_path / f"part{i}.fgb"
        pyogrio.write_dataframe(part, path, driver="FlatGeobuf")
        halves.append(entry(path, "flatgeobuf"))
    whole, whole_sink = shard(tmp_path, [entry(one, "flatgeobuf")], chunk_rows=300)
    split, split_sink = shard(tmp_path, halves, chunk_rows=300)
    assert split.rows_per_source == {str(halves[0][0]): 500, str(halves[1][0]): 700}
    # The Hilbert order spans the files: same chunks as one file holding both.
    assert [split_sink.objects[c.key] for c in split.chunks.chunks] == \
        [whole_sink.objects[c.key] for c in whole.chunks.chunks]


def test_numeric_columns_widen_across_a_layers_files(tmp_path):
    a = gpd.GeoDataFrame({"v": np.array([1, 2], dtype="int32")},
                         geometry=[shapely.Point(0, 0), shapely.Point(1, 1)], crs="EPSG:4326")
    b = gpd.GeoDataFrame({"v": [2.5]}, geometry=[shapely.Point(2, 2)], crs="EPSG:4326")
    a.to_parquet(tmp_path / "a.parquet")
    b.to_parquet(tmp_path / "b.parquet")
    result, sink = shard(tmp_path, [entry(tmp_path / "a.parquet", "geoparquet"),
                                    entry(tmp_path / "b.parquet", "geoparquet")])
    assert result.schema.field("v").type == pa.float64()
    assert sorted(chunk_table(sink, result).column("v").to_pylist()) == [1.0, 2.0, 2.5]


def test_all_layers_of_a_geopackage_feed_one_layer_each(tmp_path):
    path = tmp_path / "city.gpkg"
    roads = gpd.GeoDataFrame({"name": ["a", "b"]}, crs="EPSG:3857", geometry=[
        shapely.LineString([(0, 0), (1, 1)]), shapely.LineString([(1, 1), (2, 0)])])
    parks = gpd.GeoDataFrame({"area": [1.0]}, geometry=[shapely.box(0, 0, 1, 1)], crs="EPSG:3857")
    pyogrio.write_dataframe(roads, path, layer="Roads (2020)", driver="GPKG")
    pyogrio.write_dataframe(parks, path, layer="2nd Parks", driver="GPKG")
    spec = DataFile(path="city.gpkg", layer="base", format="gpkg", all_layers=True)
    plan = plan_layers([(path, spec)])
    assert list(plan) == ["base_roads_2020", "base__2nd_parks"]
    assert [s.source_layer for s in plan["base_roads_2020"]] == ["Roads (2020)"]
    sink = MemorySink()
    for layer, sources in plan.items():
        result = shard_layer(layer, sources, sink, scratch_dir=tmp_path, limits=ShardLimits())
        assert result.chunks.layer == layer
    assert result.geometry_types == ["Polygon"] and result.schema.names == ["area", "geometry"]


@pytest.mark.parametrize(("name", "expected"), [
    ("Roads (2020)", "roads_2020"), ("Café Zones", "cafe_zones"), ("2020", "_2020"),
    ("already_ok", "already_ok"), ("x" * 80, "x" * 80)])
def test_normalised_layer_names(name, expected):
    assert normalised_layer_name(name) == expected


def test_expanded_layer_names_fit_63_bytes(tmp_path):
    path = tmp_path / "long.gpkg"
    frame = gpd.GeoDataFrame(geometry=[shapely.Point(0, 0)], crs="EPSG:4326")
    pyogrio.write_dataframe(frame, path, layer="L" * 80, driver="GPKG")
    plan = plan_layers([(path, DataFile(path="long.gpkg", layer="base", format="gpkg",
                                        all_layers=True))])
    assert list(plan) == ["base_" + "l" * 58]


# --------------------------------------------------------------------------------------
# Bad input: each is an InputDataError naming the file, the layer and the problem
# --------------------------------------------------------------------------------------


def fails(tmp_path, files, match, **limits):
    with pytest.raises(InputDataError, match=match) as caught:
        shard(tmp_path, files, **limits)
    return str(caught.value)


def test_corrupt_file(tmp_path):
    path = tmp_path / "broken.fgb"
    path.write_bytes(b"this is not a flatgeobuf file at all")
    fails(tmp_path, [entry(path, "flatgeobuf")],
          r"file 'broken.fgb' \(layer 'points'\): declared flatgeobuf but its bytes are text, not "
          r"a FlatGeobuf file")


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.fgb"
    pyogrio.write_dataframe(synthetic_points(3000, seed=2), path, driver="FlatGeobuf")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    fails(tmp_path, [entry(path, "flatgeobuf")], r"file 'cut.fgb' \(layer 'points'\)")


def test_mislabelled_format(tmp_path, points):
    path = tmp_path / "points.fgb"
    pyogrio.write_dataframe(points, path, driver="GeoJSON")
    fails(tmp_path, [entry(path, "flatgeobuf")],
          r"file 'points.fgb' \(layer 'points'\): declared flatgeobuf but its bytes are JSON text, "
          r"not a FlatGeobuf file")


def test_parquet_declared_as_another_format(tmp_path, points):
    path = tmp_path / "points.gpkg"
    points.to_parquet(path)
    fails(tmp_path, [entry(path, "gpkg")],
          r"'points.gpkg'.*declared gpkg but its bytes are a Parquet file, not a GeoPackage")


def test_not_a_zip(tmp_path, points):
    path = tmp_path / "points.zip"
    path.write_text(points.to_json())
    fails(tmp_path, [entry(path, "shapefile_zip")],
          r"'points.zip'.*declared shapefile_zip but its bytes are JSON text, not a zip archive")


def _shapefile_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "shp"
    folder.mkdir()
    for part in NATURAL_EARTH_DIR.glob("naturalearth_lowres.*"):
        (folder / f"countries{part.suffix}").write_bytes(part.read_bytes())
    return folder


def test_shapefile_zip_without_shx(tmp_path):
    zipped = zip_folder(_shapefile_folder(tmp_path), tmp_path / "c.zip", skip={".shx"})
    fails(tmp_path, [entry(zipped, "shapefile_zip", source_crs="EPSG:4326")],
          r"'c.zip'.*has 'countries.shp' but no .shx file next to it")


def test_shapefile_zip_without_prj_needs_source_crs(tmp_path):
    zipped = zip_folder(_shapefile_folder(tmp_path), tmp_path / "c.zip", skip={".prj"})
    fails(tmp_path, [entry(zipped, "shapefile_zip", layer="countries")],
          r"file 'c.zip' \(layer 'countries'\) declares no CRS \(a Shapefile without .prj\?\) and "
          r"the manifest gives no source_crs; add source_crs")
    result, _ = shard(tmp_path, [entry(zipped, "shapefile_zip", source_crs="EPSG:4326")])
    assert result.rows == 177 and result.chunks.crs == "EPSG:4326"


def test_declared_crs_must_match_the_files(tmp_path):
    zipped = natural_earth_countries_zip(tmp_path / "countries.zip")
    message = fails(tmp_path, [entry(zipped, "shapefile_zip", source_crs="EPSG:3857")],
                    r"'countries.zip'.*declares source_crs 'EPSG:3857'")
    assert "Pseudo-Mercator" in message and "WGS 84 (EPSG:4326)" in message


def test_files_of_a_layer_must_share_a_crs(tmp_path, points):
    a, b = tmp_path / "a.fgb", tmp_path / "b.fgb"
    pyogrio.write_dataframe(points, a, driver="FlatGeobuf")
    pyogrio.write_dataframe(points.to_crs("EPSG:3857"), b, driver="FlatGeobuf")
    fails(tmp_path, [entry(a, "flatgeobuf"), entry(b, "flatgeobuf")],
          r"layer 'points': file 'a.fgb' is in WGS 84 \(EPSG:4326\) but file 'b.fgb' is in "
          r"WGS 84 / Pseudo-Mercator \(EPSG:3857\)")


def _cp1252_shapefile(tmp_path: Path, cpg: str | None) -> Path:
    folder = tmp_path / "enc"
    folder.mkdir()
    frame = gpd.GeoDataFrame({"name": ["Zürich", "Café"]}, crs="EPSG:4326",
                             geometry=[shapely.Point(8.5, 47.4), shapely.Point(2.3, 48.9)])
    pyogrio.write_dataframe(frame, folder / "places.shp", encoding="cp1252")
    (folder / "places.cpg").unlink()
    if cpg is not None:
        (folder / "places.cpg").write_text(cpg)
    return zip_folder(folder, tmp_path / "places.zip")


def test_undecodable_text_names_file_row_and_encoding(tmp_path):
    zipped = _cp1252_shapefile(tmp_path, cpg="UTF-8")  # a .cpg that lies
    message = fails(tmp_path, [entry(zipped, "shapefile_zip", layer="places")],
                    r"file 'places.zip' \(layer 'places'\), row 1, column 'name': text .* is not "
                    r"valid in encoding UTF-8 \(declared by places.cpg\); set 'encoding'")
    assert "cp1252" in message


def test_declared_encoding_is_honoured(tmp_path):
    zipped = _cp1252_shapefile(tmp_path, cpg=None)
    fails(tmp_path, [entry(zipped, "shapefile_zip")], r"(?s)row 1, column 'name'.*not valid in encoding "
          r"UTF-8 \(no .cpg and no encoding in the manifest\)")
    result, sink = shard(tmp_path, [entry(zipped, "shapefile_zip", encoding="cp1252")])
    assert sorted(chunk_table(sink, result).column("name").to_pylist()) == ["Café", "Zürich"]


def test_csv_encoding_is_transcoded_or_rejected(tmp_path):
    path = tmp_path / "places.csv"
    path.write_bytes("id,name,wkt\n1,Zürich,POINT (8.5 47.4)\n".encode("cp1252"))
    options = {"source_crs": "EPSG:4326", "csv": {"wkt_column": "wkt"}}
    fails(tmp_path, [entry(path, "csv", **options)], r"(?s)'places.csv'.*data line 1, column 'name'")
    result, sink = shard(tmp_path, [entry(path, "csv", encoding="cp1252", **options)])
    assert chunk_table(sink, result).column("name").to_pylist() == ["Zürich"]
    fails(tmp_path, [entry(path, "csv", encoding="ascii", **options)],
          r"'places.csv'.*byte 15 \(line 2\) cannot be decoded as the declared encoding 'ascii'")


def test_nan_coordinates_name_the_row(tmp_path):
    frame = gpd.GeoDataFrame({"a": [1, 2, 3]}, crs="EPSG:4326", geometry=[
        shapely.Point(0, 0), shapely.Point(1, 1), shapely.Point(np.nan, 1)])
    frame.to_parquet(tmp_path / "nan.parquet")
    result, _ = shard(tmp_path, [entry(tmp_path / "nan.parquet", "geoparquet", layer="pts")])
    assert result.rows == 2
    assert [(step, reason, json.loads(values)) for step, reason, values in result.rejected] == [
        ("read", "file 'nan.parquet' (layer 'pts'), row 3: coordinates are NaN or infinite; "
         "expected finite numbers", {"a": 3})]


def test_infinite_polygon_vertex_names_the_row(tmp_path, monkeypatch):
    monkeypatch.setattr("libs.sharding.wkb.PARSE_BYTES", 50)  # parse row by row: the row still counts
    polygons = [shapely.box(0, 0, 1, 1), shapely.Polygon([(0, 0), (np.inf, 0), (1, 1)])]
    gpd.GeoDataFrame({"a": [1, 2]}, geometry=polygons, crs="EPSG:4326").to_parquet(tmp_path / "p.parquet")
    result, _ = shard(tmp_path, [entry(tmp_path / "p.parquet", "geoparquet")])
    assert result.rows == 1
    [(step, reason, _)] = result.rejected
    assert step == "read" and reason.startswith("file 'p.parquet' (layer 'points'), row 2: coord")


def test_mixed_geometry_types_in_a_file(tmp_path):
    """geometry_families: 'mixed' (default) keeps both, 'one' fails naming both, 'split'
    feeds one layer per family (the polygons' empty) and fails on a row of no family."""
    path = tmp_path / "mixed.geojson"
    things = [shapely.Point(0, 0), shapely.LineString([(0, 0), (1, 1)]), shapely.Point(2, 2)]
    gpd.GeoDataFrame({"n": [0, 1, 2]}, geometry=things, crs="EPSG:4326").to_file(
        path, driver="GeoJSON")
    result, sink = shard(tmp_path, [entry(path, "geojson", layer="things")])
    assert result.rows == 3 and result.geometry_types == ["LineString", "Point"]
    fails(tmp_path, [entry(path, "geojson", layer="things", geometry_families="one")],
          r"file 'mixed.geojson' \(layer 'things'\) mixes Point \(row 1\) and LineString \(row 2\)")
    split = [entry(path, "geojson", layer="things", geometry_families="split")]
    assert list(plan_layers(split)) == ["things_points", "things_lines", "things_polygons"]
    for layer, expected in (("things_points", [0, 2]), ("things_lines", [1]),
                            ("things_polygons", [])):
        result, sink = shard(tmp_path, split, layer=layer)
        assert chunk_table(sink, result).column("n").to_pylist() == expected
    gpd.GeoDataFrame({"n": [0, 1]}, geometry=[shapely.Point(0, 0), None],
                     crs="EPSG:4326").to_file(path, driver="GeoJSON")
    fails(tmp_path, split, r"'mixed.geojson'.*feature 2: no geometry.*geometry_families 'split'")


def test_mixed_geometry_types_across_files(tmp_path, points):
    a, b = tmp_path / "a.fgb", tmp_path / "b.fgb"
    pyogrio.write_dataframe(points, a, driver="FlatGeobuf")
    boxes = points.iloc[:1].set_geometry([shapely.box(0, 0, 1, 1)])
    pyogrio.write_dataframe(boxes, b, driver="FlatGeobuf")
    fails(tmp_path, [entry(a, "flatgeobuf", geometry_families="one"),
                     entry(b, "flatgeobuf", geometry_families="one")],
          r"layer 'points' mixes Point \(file 'a.fgb', row 1\) and Polygon \(file 'b.fgb', row 1\)")
    result, _ = shard(tmp_path, [entry(a, "flatgeobuf"), entry(b, "flatgeobuf")])
    assert result.geometry_types == ["Point", "Polygon"]


def _wkb_array(geoms, **to_wkb) -> pa.Array:
    return pa.array(list(shapely.to_wkb(np.asarray(geoms, dtype=object), **to_wkb)), pa.binary())


def _walked_geometries() -> list:
    """Lines, polygons with holes and their Multi* forms, Natural Earth's (multi)polygons,
    NULLs: what the WKB walk reads."""
    rng = np.random.default_rng(7)
    lines = [shapely.LineString(rng.uniform(-50, 50, (int(rng.integers(2, 9)), 2)))
             for _ in range(300)]
    holed = [shapely.Polygon(shapely.box(x, y, x + 4, y + 3).exterior,
                             [shapely.box(x + 1, y + 1, x + 2, y + 2).exterior])
             for x, y in rng.uniform(-80, 80, (100, 2))]
    countries = gpd.read_file(NATURAL_EARTH_DIR / "naturalearth_lowres.shp").geometry.tolist()
    multi = [shapely.MultiLineString(lines[i:i + 3]) for i in range(0, 60, 3)]
    multi += [shapely.MultiPolygon(holed[i:i + 2]) for i in range(0, 40, 2)]
    multi += [shapely.MultiPoint(rng.uniform(-5, 5, (4, 2))) for _ in range(20)]
    geoms = lines + holed + countries + multi
    geoms[5] = geoms[77] = None
    return geoms


def test_bounds_of_lines_and_polygons_walk_the_wkb_and_equal_shapely():
    geoms = _walked_geometries()
    array = _wkb_array(geoms, flavor="iso")
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    assert walked_bounds(array, valid) is not None  # the walk took this batch
    bounds, _ = geometry_bounds(array, "file 'x'", 0)
    np.testing.assert_array_equal(np.column_stack(bounds), shapely.bounds(np.asarray(geoms)))


def test_bounds_outside_the_walk_come_from_shapely():
    geoms = _walked_geometries()
    for case, array in {
        "big-endian": _wkb_array(geoms, flavor="iso", byte_order=0),
        "with Z": _wkb_array([shapely.force_3d(g, 5.0) if g is not None else None for g in geoms],
                             flavor="iso"),
    }.items():
        valid = array.is_valid().to_numpy(zero_copy_only=False)
        assert walked_bounds(array, valid) is None, case
        bounds, _ = geometry_bounds(array, "file 'x'", 0)
        np.testing.assert_array_equal(np.column_stack(bounds), shapely.bounds(np.asarray(geoms)),
                                      err_msg=case)


def test_geometries_geos_refuses_fail_as_before_the_walk():
    """The walk reads these, but GEOS would not: shapely's verdict names the row."""
    fine = shapely.to_wkb(shapely.box(0, 0, 1, 1), flavor="iso")
    ring = [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0), (0.5, 0.5)]  # not closed
    unclosed = b"\x01" + (3).to_bytes(4, "little") + (1).to_bytes(4, "little") + \
        len(ring).to_bytes(4, "little") + np.asarray(ring, "<f8").tobytes()
    array = pa.array([fine, fine, unclosed], pa.binary())
    with pytest.raises(InputDataError, match=r"file 'x', row 12: the geometry is not valid WKB"):
        geometry_bounds(array, "file 'x'", 10)
    nan_line = shapely.to_wkb(shapely.LineString([(0, 0), (np.nan, 1)]), flavor="iso")
    with pytest.raises(InputDataError, match=r"file 'x', row 11: coordinates are NaN or infinite"):
        geometry_bounds(pa.array([fine, nan_line], pa.binary()), "file 'x'", 10)


def test_geometry_collections_are_refused(tmp_path):
    path = tmp_path / "gc.geojson"
    collection = shapely.GeometryCollection([shapely.Point(0, 0)])
    gpd.GeoDataFrame(geometry=[shapely.Point(1, 1), collection], crs="EPSG:4326").to_file(path)
    fails(tmp_path, [entry(path, "geojson")], r"'gc.geojson'.*row 2: GeometryCollection is not supported")


def test_curves_are_refused(tmp_path):
    path = tmp_path / "curve.gpkg"
    path.write_bytes((PYOGRIO_FIXTURES / "curve.gpkg").read_bytes())
    fails(tmp_path, [entry(path, "gpkg", source_crs=None)], r"'curve.gpkg'.*row 1: CompoundCurve "
          "geometries are not supported")


def _zip_with(tmp_path: Path, members: dict[str, bytes]) -> Path:
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
    return path


@pytest.mark.parametrize("member", ["../outside.shp", "/etc/passwd.shp", "a/../../b.shp"])
def test_zip_member_paths_must_stay_inside(tmp_path, member):
    path = _zip_with(tmp_path, {member: b"x"})
    fails(tmp_path, [entry(path, "shapefile_zip")], rf"'evil.zip'.*zip member '{member}' has an "
          "absolute or '..' path")


def test_zip_bombs_are_refused_before_gdal_reads_them(tmp_path):
    path = _zip_with(tmp_path, {"a.shp": b"\0" * 5_000_000})
    fails(tmp_path, [entry(path, "shapefile_zip")], r"'evil.zip'.*inflates \d+x its size.*over the "
          r"limit of 100x \(ShardLimits.max_zip_ratio\)")
    fails(tmp_path, [entry(path, "shapefile_zip")], r"inflates to 5,000,000 bytes, over the limit of "
          "1,000,000", max_zip_bytes=1_000_000, max_zip_ratio=1e9)


def test_columns_of_a_layers_files_must_agree(tmp_path):
    a = gpd.GeoDataFrame({"id": [1], "name": ["x"]}, geometry=[shapely.Point(0, 0)], crs="EPSG:4326")
    b = gpd.GeoDataFrame({"id": ["one"], "kind": ["y"]}, geometry=[shapely.Point(1, 1)],
                         crs="EPSG:4326")
    pyogrio.write_dataframe(a, tmp_path / "a.fgb", driver="FlatGeobuf")
    pyogrio.write_dataframe(b, tmp_path / "b.fgb", driver="FlatGeobuf")
    message = fails(tmp_path, [entry(tmp_path / "a.fgb", "flatgeobuf"),
                               entry(tmp_path / "b.fgb", "flatgeobuf")],
                    r"layer 'points': files 'a.fgb' and 'b.fgb' have different columns")
    assert "only in 'a.fgb': ['name']" in message and "only in 'b.fgb': ['kind']" in message
    assert "column 'id' is int64 in 'a.fgb' but string in 'b.fgb'" in message


def test_an_empty_file_is_one_empty_chunk_with_the_layers_schema(tmp_path):
    """An empty delivery is valid (issue 27): the layer is one chunk of no rows that keeps
    the file's columns, CRS and geometry column, and no bbox."""
    path = tmp_path / "empty.gpkg"
    frame = gpd.GeoDataFrame({"name": pd.Series([], dtype="string"),
                              "height": pd.Series([], dtype="float64")},
                             geometry=gpd.GeoSeries([], crs="EPSG:3857"))
    pyogrio.write_dataframe(frame, path, layer="empty", geometry_type="Point")
    result, sink = shard(tmp_path, [entry(path, "gpkg")])
    assert result.rows == 0 and len(result.chunks.chunks) == 1
    chunk = result.chunks.chunks[0]
    assert chunk.rows == 0 and chunk.bbox is None
    table = chunk_table(sink, result)
    assert table.num_rows == 0 and {"name", "height", "geometry"} <= set(table.column_names)
    assert gpd.read_parquet(io.BytesIO(sink.objects[chunk.key])).crs.to_epsg() == 3857
    geojson = tmp_path / "empty.geojson"
    geojson.write_text('{"type": "FeatureCollection", "features": []}')
    csv = tmp_path / "empty.csv"
    csv.write_text("id,wkt\n")
    pyogrio.write_dataframe(frame, tmp_path / "empty.fgb", driver="FlatGeobuf",
                            geometry_type="Point")
    frame.to_parquet(tmp_path / "empty.parquet")
    for other in (entry(geojson, "geojson", source_crs="EPSG:4326"),
                  entry(csv, "csv", source_crs="EPSG:4326", csv={"wkt_column": "wkt"}),
                  entry(tmp_path / "empty.fgb", "flatgeobuf"),
                  entry(tmp_path / "empty.parquet", "geoparquet")):
        result, _ = shard(tmp_path, [other])
        assert (result.rows, len(result.chunks.chunks)) == (0, 1), other[0].name


def test_csv_needs_a_source_crs_and_readable_geometry(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,wkt,lon,lat\n1,POINT (1 2),1,2\n2,POINT (oops),x,4\n3,,,\n")
    fails(tmp_path, [entry(path, "csv", csv={"wkt_column": "wkt"})], r"'p.csv'.*declares no CRS "
          r"\(a CSV file never does\)")
    xy = {"x_column": "lon", "y_column": "lat"}
    # a bad row is a reject naming its 1-based data line (the header is not counted)
    for csv, text, reason in [
        ({"wkt_column": "wkt"}, None,
         "data line 2: column 'wkt' holds 'POINT (oops)', which is not valid WKT"),
        (xy, "id,lon,lat\n1,1,2\n2,x,4\n", "data line 2: column 'lon' is not a number"),
        (xy, "id,lon,lat\n1,1,2\n2,nan,4\n",
         "data line 2: x/y ('lon', 'lat') are (nan, 4.0); expected two finite numbers")]:
        if text:
            path.write_text(text)
        result, _ = shard(tmp_path, [entry(path, "csv", source_crs="EPSG:4326", csv=csv)])
        [(step, got, values)] = result.rejected
        assert step == "read" and got.startswith(f"file 'p.csv' (layer 'points'), {reason}"), got
        assert json.loads(values)["id"] == 2  # typed: CSV attribute types are inferred
    fails(tmp_path, [entry(path, "csv", source_crs="EPSG:4326",
                           csv={"x_column": "x", "y_column": "y"})], r"the CSV has no column 'x'")


def test_geoparquet_crs_comes_from_its_metadata(tmp_path, points):
    no_crs_key = points.copy()
    no_crs_key.to_parquet(tmp_path / "a.parquet")
    table = pq.read_table(tmp_path / "a.parquet")
    geo = json.loads(table.schema.metadata[b"geo"])
    del geo["columns"]["geometry"]["crs"]  # absent crs key = OGC:CRS84
    pq.write_table(table.replace_schema_metadata({b"geo": json.dumps(geo).encode()}),
                   tmp_path / "a.parquet")
    result, _ = shard(tmp_path, [entry(tmp_path / "a.parquet", "geoparquet")])
    assert result.chunks.crs == "OGC:CRS84"
    geo["columns"]["geometry"]["crs"] = None  # explicitly unknown
    pq.write_table(table.replace_schema_metadata({b"geo": json.dumps(geo).encode()}),
                   tmp_path / "a.parquet")
    fails(tmp_path, [entry(tmp_path / "a.parquet", "geoparquet")], r"'a.parquet'.*declares no CRS")
    plain = tmp_path / "plain.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(plain)
    fails(tmp_path, [entry(plain, "geoparquet")], r"'plain.parquet'.*without GeoParquet 'geo' metadata")


def test_bad_input_is_never_modified(tmp_path):
    zipped = _cp1252_shapefile(tmp_path, cpg="UTF-8")
    broken = tmp_path / "broken.fgb"
    broken.write_bytes(b"garbage")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (zipped, broken)}
    for files in ([entry(zipped, "shapefile_zip")], [entry(broken, "flatgeobuf")]):
        with pytest.raises(InputDataError):
            shard(tmp_path, files)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.fgb", "enc", "places.zip", "scratch"]
    assert list((tmp_path / "scratch").iterdir()) == []  # spill files are cleaned up too


def test_sources_built_without_plan_layers_are_checked_too(tmp_path, points):
    path = tmp_path / "points.fgb"
    pyogrio.write_dataframe(points, path, driver="GeoJSON")
    source = LayerSource(path, DataFile(path="points.fgb", layer="points", format="flatgeobuf"), None)
    with pytest.raises(InputDataError, match="declared flatgeobuf but its bytes are JSON text"):
        shard_layer("points", [source], MemorySink(), scratch_dir=tmp_path, limits=ShardLimits())


# --- issue 27: CSV attribute types ------------------------------------------------------------

TYPED_CSV = (
    "wkt,count,ratio,flag,day,zip,mixed,blank,stamp,big\n"
    'POINT (1 2),1,0.5,true,2024-02-29,01234,1,,2024-01-01T10:00,1\n'
    'POINT (3 4),-20, 2.5e3 ,FALSE,2024-03-01,98765,x,,2024-01-02T10:00,99999999999999999999\n'
    'POINT (5 6),,.5,,,00001,2,,,3\n'
)


def test_csv_attribute_types_are_inferred_from_every_value(tmp_path):
    path = tmp_path / "typed.csv"
    path.write_text(TYPED_CSV)
    result, sink = shard(tmp_path, [entry(path, "csv", source_crs="EPSG:4326",
                                          csv={"wkt_column": "wkt"})], read_batch_rows=2)
    table = chunk_table(sink, result).sort_by("count")
    types = {f.name: str(f.type) for f in table.schema if f.name not in ("geometry", "bbox")}
    assert types == {"count": "int64", "ratio": "double", "flag": "bool", "day": "date32[day]",
                     "zip": "string", "mixed": "string", "blank": "string", "stamp": "string",
                     "big": "double"}
    rows = {r["count"]: r for r in table.to_pylist()}
    assert rows[1]["ratio"] == 0.5 and rows[-20]["ratio"] == 2500.0 and rows[None]["ratio"] == 0.5
    assert [rows[k]["flag"] for k in (1, -20, None)] == [True, False, None]
    assert str(rows[1]["day"]) == "2024-02-29" and rows[None]["day"] is None
    assert rows[1]["zip"] == "01234"  # a leading zero keeps a column text
    assert rows[-20]["mixed"] == "x" and rows[1]["blank"] == ""  # text columns as read


def test_csv_column_types_override_and_opt_out(tmp_path):
    path = tmp_path / "typed.csv"
    path.write_text(TYPED_CSV)
    csv = {"wkt_column": "wkt", "column_types": {"zip": "int64", "count": "string",
                                                  "flag": "string"}}
    result, sink = shard(tmp_path, [entry(path, "csv", source_crs="EPSG:4326", csv=csv)])
    schema = chunk_table(sink, result).schema
    assert (schema.field("zip").type, schema.field("count").type, schema.field("flag").type,
            schema.field("ratio").type) == (pa.int64(), pa.string(), pa.string(), pa.float64())
    assert sorted(chunk_table(sink, result).column("zip").to_pylist()) == [1, 1234, 98765]
    result, sink = shard(tmp_path, [entry(path, "csv", source_crs="EPSG:4326", csv={
        "wkt_column": "wkt", "infer_types": False, "column_types": {"ratio": "float64"}})])
    schema = chunk_table(sink, result).schema
    assert schema.field("ratio").type == pa.float64() and schema.field("count").type == pa.string()


def test_csv_declared_type_a_value_does_not_fit_is_a_reject_naming_line_column_and_value(
        tmp_path):
    path = tmp_path / "typed.csv"
    path.write_text(TYPED_CSV)
    result, sink = shard(tmp_path, [entry(path, "csv", source_crs="EPSG:4326", csv={
        "wkt_column": "wkt", "column_types": {"mixed": "int64"}})])
    assert sorted(chunk_table(sink, result).column("mixed").to_pylist()) == [1, 2]
    [(step, reason, values)] = result.rejected
    assert step == "read" and reason == (
        "file 'typed.csv' (layer 'points'), data line 2, column 'mixed': 'x' is not a valid "
        "int64 value, the type the manifest declares for it in csv.column_types; fix the value, "
        "or declare the column 'string'")
    assert json.loads(values)["zip"] == "98765"  # the row's attributes, as read
    fails(tmp_path, [entry(path, "csv", source_crs="EPSG:4326", csv={
        "wkt_column": "wkt", "column_types": {"nope": "int64"}})],
        r"csv.column_types names \['nope'\], which the file does not have as attribute columns")
