import io
import zipfile

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pyogrio
import pytest
import shapely
from geopandas.testing import assert_geodataframe_equal

from libs.errors import InputDataError
from libs.geoparquet import read_geoparquet_bytes
from libs.manifest import DataFile
from libs.sample_batch import natural_earth_countries_zip, synthetic_points
from libs.sharding import shard_to_geoparquet
from libs.transformations import make_valid, transform_chunk_bytes


class MemorySink:
    def __init__(self):
        self.objects: dict[str, bytes] = {}

    def __call__(self, ordinal: int, data: bytes) -> str:
        key = f"chunk-{ordinal:05d}.parquet"
        self.objects[key] = data
        return key


def _points_file(tmp_path, n=1000, driver="FlatGeobuf", suffix="fgb"):
    path = tmp_path / f"points.{suffix}"
    pyogrio.write_dataframe(synthetic_points(n, seed=7), path, driver=driver)
    return path


def test_chunks_are_bounded_and_reassemble_the_file(tmp_path):
    path = _points_file(tmp_path, n=1000)
    spec = DataFile(path="points.fgb", layer="points", format="flatgeobuf", source_crs="EPSG:3857")
    sink = MemorySink()
    chunks = shard_to_geoparquet(path, spec, sink, chunk_rows=300)
    assert [c.rows for c in chunks] == [300, 300, 300, 100]
    assert [c.row_offset for c in chunks] == [0, 300, 600, 900]
    frames = [read_geoparquet_bytes(sink.objects[c.key]) for c in chunks]
    whole = gpd.GeoDataFrame(gpd.pd.concat(frames, ignore_index=True), crs=frames[0].crs)
    original = pyogrio.read_dataframe(path)
    assert sorted(whole["point_id"]) == sorted(original["point_id"])
    for chunk, frame in zip(chunks, frames, strict=True):
        minx, miny, maxx, maxy = frame.total_bounds
        assert chunk.bbox == pytest.approx((minx, miny, maxx, maxy))
    geo = pq.read_schema(io.BytesIO(sink.objects[chunks[0].key])).metadata[b"geo"]
    assert b'"version": "1.1.0"' in geo and b"covering" in geo


def test_zipped_shapefile_of_natural_earth(tmp_path):
    zipped = natural_earth_countries_zip(tmp_path / "countries.zip")
    spec = DataFile(path="countries.zip", layer="countries", format="shapefile_zip",
                    source_crs="EPSG:4326")
    sink = MemorySink()
    chunks = shard_to_geoparquet(zipped, spec, sink, chunk_rows=100)
    assert sum(c.rows for c in chunks) == 177
    assert set(read_geoparquet_bytes(sink.objects[chunks[0].key]).columns) >= {"name", "iso_a3"}


def test_declared_crs_must_match_the_file(tmp_path):
    zipped = natural_earth_countries_zip(tmp_path / "countries.zip")
    spec = DataFile(path="countries.zip", layer="countries", format="shapefile_zip",
                    source_crs="EPSG:3857")
    with pytest.raises(InputDataError, match="countries.zip.*declares source_crs 'EPSG:3857'"):
        shard_to_geoparquet(zipped, spec, MemorySink(), chunk_rows=100)


def test_corrupt_file_names_the_file(tmp_path):
    path = tmp_path / "broken.fgb"
    path.write_bytes(b"this is not a flatgeobuf file at all")
    spec = DataFile(path="broken.fgb", layer="points", format="flatgeobuf", source_crs="EPSG:4326")
    with pytest.raises(InputDataError, match="'broken.fgb'.*cannot be read as flatgeobuf"):
        shard_to_geoparquet(path, spec, MemorySink(), chunk_rows=10)


def test_nan_coordinates_name_the_row(tmp_path):
    frame = gpd.GeoDataFrame({"a": [1, 2, 3]}, geometry=[shapely.Point(0, 0), shapely.Point(1, 1),
                                                         shapely.Point(np.nan, 1)], crs="EPSG:4326")
    path = tmp_path / "nan.parquet"
    frame.to_parquet(path)
    spec = DataFile(path="nan.parquet", layer="pts", format="geoparquet", source_crs="EPSG:4326")
    with pytest.raises(InputDataError, match=r"'nan.parquet'.*row 2: coordinates are NaN"):
        shard_to_geoparquet(path, spec, MemorySink(), chunk_rows=10)


def test_parquet_without_geo_metadata_is_rejected(tmp_path):
    path = tmp_path / "plain.parquet"
    gpd.pd.DataFrame({"a": [1]}).to_parquet(path)
    spec = DataFile(path="plain.parquet", layer="pts", format="geoparquet", source_crs="EPSG:4326")
    with pytest.raises(InputDataError, match="without GeoParquet 'geo' metadata"):
        shard_to_geoparquet(path, spec, MemorySink(), chunk_rows=10)


def test_transform_equals_plain_geopandas(tmp_path):
    path = _points_file(tmp_path, n=500)
    spec = DataFile(path="points.fgb", layer="points", format="flatgeobuf", source_crs="EPSG:3857")
    sink = MemorySink()
    (chunk,) = shard_to_geoparquet(path, spec, sink, chunk_rows=1000)
    result = transform_chunk_bytes(sink.objects[chunk.key], "EPSG:8857")
    assert (result.rows_in, result.rows_out, result.rows_rejected) == (500, 500, 0)
    ours = read_geoparquet_bytes(result.data)
    expected = read_geoparquet_bytes(sink.objects[chunk.key]).to_crs("EPSG:8857")
    assert_geodataframe_equal(ours, expected, check_less_precise=True)
    assert transform_chunk_bytes(sink.objects[chunk.key], "EPSG:8857").data == result.data


def test_make_valid_repairs_a_bowtie():
    bowtie = shapely.from_wkt("POLYGON ((0 0, 1 1, 1 0, 0 1, 0 0))")
    frame = gpd.GeoDataFrame({"a": [1, 2]}, geometry=[bowtie, shapely.box(0, 0, 1, 1)],
                             crs="EPSG:3857")
    repaired = make_valid(frame)
    assert repaired.geometry.is_valid.all()
    assert repaired.geometry.iloc[0].area == pytest.approx(0.5)
    assert repaired.geometry.iloc[1].equals(shapely.box(0, 0, 1, 1))


def test_zip_archive_members_are_read_in_place(tmp_path):
    zipped = natural_earth_countries_zip(tmp_path / "c.zip")
    assert {n.rsplit(".", 1)[1] for n in zipfile.ZipFile(zipped).namelist()} >= {"shp", "shx",
                                                                               "dbf", "prj"}
