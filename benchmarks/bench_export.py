"""Export stage: a PostGIS table out to GeoParquet in the object store, ours against the peers'.

N seeded points (``BENCH_EXPORT_POINTS``, default 1,000,000: point_id, value, category,
EPSG:8857), shaped like a carrying join's result (one row per feature), are COPYed into a run
schema before timing. Then each case takes them out of PostGIS and leaves GeoParquet in the
object store:

* ``ours``: the pipeline's export as the job runs it: ``libs.postgis.export_table``
  (ADBC reads the table as Arrow, parts of at most 250k rows as GeoParquet 1.1 with the bbox
  covering, one PUT per part into the staging bucket), then ``libs.lake.publish_to_lake`` (server-side copies,
  completion manifest last).
* ``ogr2ogr``: the ogr2ogr peer's export (``benchmarks.pipelines.Ogr2ogr``): ``ogr2ogr -f
  FlatGeobuf`` out of PostGIS (Debian's GDAL has no Parquet driver), pyogrio reads that as
  Arrow, pyarrow writes GeoParquet, one PUT.
* ``read_postgis``: the geopandas peer's: ``geopandas.read_postgis`` then ``to_parquet``, one PUT.

Ours publishes into a scratch bucket the bench creates and removes again (``bench-export-…``):
nothing but the pipeline writes to ``data-lake``. The peers PUT under a bench prefix of the
staging bucket. After timing, every output is read back: rows, ``point_id`` sum, CRS.
Ratios: ``export_vs_ogr2ogr`` and ``export_vs_read_postgis`` (features/s, best rounds).
Needs the local stack. ``BENCH_EXPORT_ROUNDS`` (default 3).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tempfile
import uuid
from functools import partial
from pathlib import Path

import geopandas as gpd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pyogrio.raw import open_arrow
from sqlalchemy import URL, create_engine

from benchmarks import summary
from benchmarks.pipelines import ogr_geo_metadata
from devstack.envfile import read_env_file
from devstack.layout import ENV_FILE
from devstack.s3 import store_settings
from libs import postgis
from libs.geoparquet import GEOMETRY, crs_of
from libs.lake import part_key, publish_to_lake, read_completion_manifest
from libs.object_store import ObjectStore
from libs.postgis import PostGISSettings, connect
from libs.sample_batch import synthetic_points

POINTS = int(os.environ.get("BENCH_EXPORT_POINTS", "1000000"))
ROUNDS = int(os.environ.get("BENCH_EXPORT_ROUNDS", "3"))
TARGET = "EPSG:8857"
SRID = 8857
STAGING = "etl-staging"
CASES = ["ogr2ogr", "read_postgis", "ours"]
PARQUET = "application/vnd.apache.parquet"
_features_per_s: dict[str, float] = {}


class Exported:
    """The loaded table, the store, and what each case's rounds wrote (checked after timing)."""

    def __init__(self, env: dict[str, str], layer: postgis.LayerTable, point_id_sum: int):
        self.settings = PostGISSettings(env["POSTGRES_HOST"], int(env["POSTGRES_PORT"]),
                                        env["POSTGRES_USER"], env["POSTGRES_PASSWORD"])
        self.layer = layer
        self.point_id_sum = point_id_sum
        # The admin identity: the rounds publish to a scratch bucket of their own, which
        # this benchmark creates and removes; the pipeline's identity may do neither.
        self.store = ObjectStore(store_settings(env, "admin"))
        self.lake = f"bench-export-{uuid.uuid4().hex[:12]}"
        self.prefix = f"bench/export-{uuid.uuid4().hex[:8]}/"
        self.outputs: dict[str, list[str]] = {case: [] for case in CASES}

    def next_output(self, case: str) -> str:
        """A fresh name for this round's output: a staging key, or ours' batch id."""
        name = f"{self.prefix}{case}/round-{len(self.outputs[case]) + 1}"
        if case == "ours":
            name = f"bench-export-round-{len(self.outputs[case]) + 1}"
        self.outputs[case].append(name)
        return name


@pytest.fixture(scope="module")
def exported():
    if not ENV_FILE.exists():
        pytest.skip("the export benchmark needs the local stack: python -m devstack up")
    env = read_env_file(ENV_FILE)
    frame = synthetic_points(POINTS, seed=5).to_crs(TARGET)
    arrow = pa.table(frame.to_arrow(geometry_encoding="WKB"))
    arrow = arrow.rename_columns([GEOMETRY if c == frame.geometry.name else c
                                  for c in arrow.column_names])
    point_id_sum = int(frame["point_id"].sum())
    del frame
    settings = PostGISSettings(env["POSTGRES_HOST"], int(env["POSTGRES_PORT"]),
                               env["POSTGRES_USER"], env["POSTGRES_PASSWORD"])
    schema = postgis.run_schema_name(str(uuid.uuid4()))
    # autocommit: the peers read the table on connections of their own
    with connect(settings, autocommit=True) as conn:
        postgis.create_schema(conn, schema)
        layer = postgis.LayerTable(schema, "points", postgis.attribute_schema(arrow),
                                        SRID, "Point")
        postgis.create_layer_table(conn, layer)
        postgis.copy_chunk_into_table(conn, layer, arrow, (0, arrow.num_rows))
        conn.execute(f'ALTER TABLE "{schema}".points ADD PRIMARY KEY (_row_id)')
        conn.execute(f'VACUUM ANALYZE "{schema}".points')
        del arrow
        state = Exported(env, layer, point_id_sum)
        state.store.client.make_bucket(state.lake)
        # SeaweedFS grows a new bucket's volumes on its first write (~1 s): not ours to time
        state.store.put_bytes(state.lake, "warm-up", b"warm-up", "text/plain")
        state.store.delete(state.lake, "warm-up")
        try:
            yield state
        finally:
            state.store.delete_prefix(STAGING, state.prefix)
            for obj in list(state.store.list(state.lake)):
                state.store.delete(state.lake, obj.key)
            state.store.client.remove_bucket(state.lake)
            postgis.drop_schema(conn, schema)


def _ours(state: Exported, batch_id: str) -> None:
    with connect(state.settings) as conn:
        parts = postgis.export_table(conn, state.layer, TARGET, state.store, STAGING,
                             partial(part_key, f"{state.prefix}ours/{batch_id}/"))
    publish_to_lake(state.store, staging_bucket=STAGING, lake_bucket=state.lake,
                    batch_id=batch_id, run_id=batch_id, datasets={"points": parts},
                    dataset_info={"points": {"kind": "join", "crs": TARGET}})


def _ogr2ogr(state: Exported, key: str) -> None:
    s = state.settings
    dsn = f"PG:host={s.host} port={s.port} user={s.user} dbname={s.dbname}"
    with tempfile.TemporaryDirectory(prefix="bench-export-") as folder:
        staged = Path(folder) / "points.fgb"
        subprocess.run(["ogr2ogr", "-f", "FlatGeobuf", str(staged), dsn,
                        f"{state.layer.schema}.{state.layer.table}", "-lco", "SPATIAL_INDEX=NO"],
                       check=True, capture_output=True,
                       env={**os.environ, "PGPASSWORD": s.password})
        out = Path(folder) / "points.parquet"
        with open_arrow(staged, use_pyarrow=True) as (meta, reader):
            schema = reader.schema.with_metadata({b"geo": ogr_geo_metadata(meta)})
            with pq.ParquetWriter(out, schema, compression="zstd") as writer:
                for batch in reader:
                    writer.write_batch(batch)
        state.store.upload(STAGING, key, out, PARQUET)


def _read_postgis(state: Exported, key: str) -> None:
    s = state.settings
    engine = create_engine(URL.create("postgresql+psycopg", s.user, s.password, s.host, s.port,
                                      s.dbname))
    try:
        frame = gpd.read_postgis(
            f'SELECT point_id, value, category, geom FROM "{state.layer.schema}".points '
            "ORDER BY _row_id", engine, geom_col="geom")
    finally:
        engine.dispose()
    buffer = io.BytesIO()
    frame.to_parquet(buffer, compression="zstd")
    state.store.put_bytes(STAGING, key, buffer.getvalue(), PARQUET)


def _check(state: Exported, case: str) -> None:
    """Every round's output holds every point once, with its attributes and the CRS."""
    assert state.outputs[case], case
    for name in state.outputs[case]:
        if case == "ours":
            manifest = read_completion_manifest(state.store, state.lake, name)
            assert manifest is not None, f"{name}: no completion manifest"
            blobs = [state.store.get_bytes(state.lake, o["key"])
                     for o in manifest["datasets"]["points"]["objects"]]
        else:
            blobs = [state.store.get_bytes(STAGING, name)]
        tables = [pq.read_table(pa.BufferReader(blob)) for blob in blobs]
        rows = sum(t.num_rows for t in tables)
        ids = sum(pc.sum(t.column("point_id")).as_py() for t in tables)
        assert (rows, ids) == (POINTS, state.point_id_sum), (case, name, rows, ids)
        geo = json.loads(tables[0].schema.metadata[b"geo"])
        assert crs_of(geo).to_epsg() == SRID, (case, geo["columns"])


@pytest.mark.benchmark(group="export")
@pytest.mark.parametrize("case", CASES)
def test_export(benchmark, exported, case):
    runners = {"ours": _ours, "ogr2ogr": _ogr2ogr, "read_postgis": _read_postgis}

    def setup():
        return (exported, exported.next_output(case)), {}

    benchmark.pedantic(runners[case], setup=setup, rounds=ROUNDS, iterations=1)
    _check(exported, case)
    stats = benchmark.stats.stats
    per_s = POINTS / stats.min
    _features_per_s[case] = per_s
    benchmark.extra_info["features_per_s"] = round(per_s)
    benchmark.extra_info["features_per_s_median"] = round(POINTS / stats.median)
    benchmark.extra_info["points"] = POINTS
    if case == "ours":
        for peer in ("ogr2ogr", "read_postgis"):
            if peer in _features_per_s:
                ratio = per_s / _features_per_s[peer]
                benchmark.extra_info[f"ratio_vs_{peer}"] = round(ratio, 3)
                summary.record_ratio(f"export_vs_{peer}", ratio,
                                     note=f"{summary.size_label(POINTS)} points, best rounds; "
                                          "ours publishes (staging + lake copy)")
        print(f"\nexport, best of {ROUNDS} rounds: "
              + ", ".join(f"{name} {value:,.0f} features/s"
                          for name, value in _features_per_s.items()))
