"""Join stage: the PostGIS join of the pipeline against geopandas ``sjoin`` on the same data.

Count and sum of N seeded points (``BENCH_JOIN_POINTS``, default 1,000,000) per Natural Earth
country, both in EPSG:8857. Loading into PostGIS (COPY, GiST, ANALYZE) happens before timing,
as the geopandas frames are read before timing: what is timed is the join and getting its
result out (``run_spatial_join`` + ``stream_table`` into Arrow) against ``gpd.sjoin`` +
``groupby``. Per-country counts are compared after timing. Needs the local stack.
"""

import os
import uuid

import geopandas as gpd
import pyarrow as pa
import pyogrio
import pytest

from benchmarks import summary
from devstack.envfile import read_env_file
from devstack.layout import ENV_FILE
from libs import postgis
from libs.geoparquet import GEOMETRY
from libs.manifest import SpatialJoin
from libs.postgis import PostGISSettings, connect
from libs.sample_batch import NATURAL_EARTH_DIR, synthetic_points

POINTS = int(os.environ.get("BENCH_JOIN_POINTS", "1000000"))
TARGET = "EPSG:8857"
SRID = 8857
JOIN = SpatialJoin.model_validate({
    "name": "points_per_country", "left": "countries", "right": "points",
    "predicate": "intersects", "how": "left",
    "aggregations": [{"function": "count", "output": "n"},
                     {"function": "sum", "column": "value", "output": "value_sum"}]})
_seconds: dict[str, float] = {}
_postgis_counts: dict[str, int] = {}


@pytest.fixture(scope="module")
def frames():
    countries = pyogrio.read_dataframe(NATURAL_EARTH_DIR / "naturalearth_lowres.shp")
    countries = countries.to_crs(TARGET)
    countries["geometry"] = countries.geometry.make_valid()
    points = synthetic_points(POINTS, seed=11).to_crs(TARGET)
    return countries, points


@pytest.fixture(scope="module")
def loaded(frames):
    if not ENV_FILE.exists():
        pytest.skip("the join benchmark needs the local stack: python -m devstack up")
    env = read_env_file(ENV_FILE)
    settings = PostGISSettings(env["POSTGRES_HOST"], int(env["POSTGRES_PORT"]),
                               env["POSTGRES_USER"], env["POSTGRES_PASSWORD"])
    schema = postgis.run_schema_name(str(uuid.uuid4()))
    with connect(settings) as conn:
        postgis.create_schema(conn, schema)
        tables = {}
        try:
            for name, frame in zip(("countries", "points"), frames, strict=True):
                arrow = pa.table(frame.to_arrow(geometry_encoding="WKB"))
                arrow = arrow.rename_columns(
                    [GEOMETRY if c == frame.geometry.name else c for c in arrow.column_names])
                # make_valid leaves countries a mix of Polygon and MultiPolygon
                layer = postgis.LayerTable(
                    schema, name, postgis.attribute_schema(arrow), SRID,
                    "Point" if name == "points" else "Geometry")
                postgis.create_layer_table(conn, layer)
                conn.commit()
                postgis.copy_chunk_into_table(conn, layer, arrow, (0, arrow.num_rows))
                postgis.index_and_analyze(conn, layer)
                tables[name] = layer
            yield conn, tables
        finally:
            conn.rollback()
            postgis.drop_schema(conn, schema)


@pytest.mark.benchmark(group="join")
def test_join_postgis(benchmark, loaded):
    conn, tables = loaded
    def run():
        with conn.transaction():  # committed: stream_table reads on a connection of its own
            result = postgis.run_spatial_join(conn, JOIN, tables["countries"],
                                                   tables["points"])
        rows = 0
        try:
            for batch in postgis.stream_table(conn, result):
                rows += batch.num_rows
                for name, n in zip(batch.column("name").to_pylist(),
                                   batch.column("n").to_pylist(), strict=True):
                    _postgis_counts[name] = n
        finally:
            with conn.transaction():
                conn.execute(f'DROP TABLE "{result.schema}"."{result.table}"')
        return rows

    rows = benchmark.pedantic(run, rounds=3, iterations=1)
    assert rows == 177
    _seconds["postgis"] = benchmark.stats.stats.median
    benchmark.extra_info["features_per_s"] = round(POINTS / _seconds["postgis"])


@pytest.mark.benchmark(group="join")
def test_join_geopandas_sjoin(benchmark, frames):
    countries, points = frames

    def run():
        joined = gpd.sjoin(countries, points, predicate="intersects", how="left")
        return joined.groupby("name").agg(n=("point_id", "count"), value_sum=("value", "sum"))

    result = benchmark.pedantic(run, rounds=3, iterations=1)
    _seconds["geopandas"] = benchmark.stats.stats.median
    benchmark.extra_info["features_per_s"] = round(POINTS / _seconds["geopandas"])
    if _postgis_counts:
        assert {k: int(v) for k, v in result["n"].items()} == _postgis_counts
    if len(_seconds) == 2:
        ratio = _seconds["geopandas"] / _seconds["postgis"]
        benchmark.extra_info["postgis_speedup_vs_sjoin"] = round(ratio, 3)
        summary.record_ratio("join_postgis_vs_sjoin", ratio,
                             note=f"{summary.size_label(POINTS)} points, medians")
        print(f"\njoin: PostGIS {_seconds['postgis']:.2f}s, geopandas sjoin "
              f"{_seconds['geopandas']:.2f}s, PostGIS/sjoin speed ratio {ratio:.2f}x")
