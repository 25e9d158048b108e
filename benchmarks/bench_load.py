"""Load stage: our parallel COPY BINARY loader against a bare psycopg loop, ogr2ogr and to_postgis.

The same points (``points_flatgeobuf``: point_id int64, value float64, category text,
EPSG:3857) go into PostGIS five ways, each round into its own fresh run schema:

* ``test_load[ours-pN]``: ``libs.postgis.load.load_layer_chunks`` over GeoParquet chunks held
  in memory (read + encode + COPY, N connections, one transaction per chunk), into the typed
  table ``create_layer_table`` makes (``geometry(Point, 3857)``).
* ``test_load[bare_copy_loop]``: the ceiling the issue names: one connection, ``copy.write_row``
  over rows whose EWKB was encoded before timing, into the same typed table.
* ``test_load[prebuilt_stream]``: the server's own bound for one connection: the whole binary
  COPY stream built before timing, sent with ``copy.write`` in large blocks.
* ``test_load[ogr2ogr]``: ``ogr2ogr -f PostgreSQL`` of the FlatGeobuf with ``PG_USE_COPY YES``.
* ``test_load[to_postgis]``: ``GeoDataFrame.to_postgis`` (geoalchemy2, COPY of CSV with hex EWKB).

No case builds indexes while timed, and every table but to_postgis's is UNLOGGED, as the
pipeline's are (why: see docs/benchmark-methods.md). Row counts (and for ours, distinct
``_row_id``) are checked after timing. ``extra_info``: rows/s and, on ``ours``,
``ratio_vs_ogr2ogr`` (target >= 4) and ``ratio_vs_bare_loop`` (target >= 0.8).

Needs the local stack (``python -m devstack up``). Sizes: ``BENCH_LOAD_POINTS`` (default
1,000,000), ``BENCH_LOAD_CHUNKS`` (8), ``BENCH_LOAD_ROUNDS`` (5), e.g.
``BENCH_LOAD_POINTS=100000 BENCH_LOAD_ROUNDS=1 .venv/bin/pytest benchmarks/bench_load.py``.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyogrio
import pytest
import shapely

from benchmarks import summary
from benchmarks.conftest import points_flatgeobuf
from devstack.envfile import read_env_file
from devstack.layout import ENV_FILE
from libs import postgis
from libs.geoparquet import GEOMETRY, read_parquet_table, to_geoparquet_bytes
from libs.postgis import PostGISSettings, connect, copy_binary

POINTS = int(os.environ.get("BENCH_LOAD_POINTS", "1000000"))
CHUNKS = int(os.environ.get("BENCH_LOAD_CHUNKS", "8"))
ROUNDS = int(os.environ.get("BENCH_LOAD_ROUNDS", "5"))
SRID = 3857
CASES = ["bare_copy_loop", "prebuilt_stream", "ogr2ogr", "to_postgis", "ours-p1", "ours-p2"]
_rows_per_s: dict[str, float] = {}


def _stack_env() -> dict[str, str]:
    if not ENV_FILE.exists():
        pytest.skip("the load benchmark needs the local stack: python -m devstack up")
    return read_env_file(ENV_FILE)


class Inputs:
    """Everything each case starts from, built once before any timing."""

    def __init__(self, settings: PostGISSettings, fgb: Path):
        self.settings = settings
        self.fgb = fgb
        self.frame = pyogrio.read_dataframe(fgb)
        per_chunk = -(-POINTS // CHUNKS)
        self.chunks: list[tuple[tuple[int, int], bytes]] = []
        for start in range(0, POINTS, per_chunk):
            part = self.frame.iloc[start:start + per_chunk]
            self.chunks.append(((start, start + len(part)), to_geoparquet_bytes(part)))
        first = read_parquet_table(self.chunks[0][1])
        self.attributes = postgis.attribute_schema(first)
        ewkb = shapely.to_wkb(shapely.set_srid(self.frame.geometry.values, SRID), include_srid=True)
        self.rows = list(zip(range(POINTS), self.frame["point_id"].tolist(),
                             self.frame["value"].tolist(), self.frame["category"].tolist(),
                             ewkb.tolist(), strict=True))
        whole = pa.table({"point_id": self.frame["point_id"].to_numpy(),
                          "value": self.frame["value"].to_numpy(),
                          "category": pa.array(self.frame["category"].tolist()),
                          GEOMETRY: pa.array(shapely.to_wkb(self.frame.geometry.values),
                                             pa.binary())})
        self.stream = b"".join(bytes(b) for b in copy_binary.copy_stream(
            [pa.array(np.arange(POINTS)), *whole.columns],
            ["int8", "int8", "float8", "text", copy_binary.Ewkb(SRID)]))


@pytest.fixture(scope="module")
def inputs():
    env = _stack_env()
    settings = PostGISSettings(env["POSTGRES_HOST"], int(env["POSTGRES_PORT"]),
                               env["POSTGRES_USER"], env["POSTGRES_PASSWORD"],
                               env.get("POSTGRES_DB", "spatial_compute"))
    return Inputs(settings, points_flatgeobuf(POINTS))


@pytest.fixture(scope="module")
def owner(inputs):
    """Creates the run schemas and holds their advisory locks, so no janitor drops them."""
    with connect(inputs.settings, autocommit=True) as conn:
        yield conn


def _fresh_layer(owner, schemas: list[str], inputs: Inputs, table: str) -> postgis.LayerTable:
    schema = postgis.run_schema_name(str(uuid.uuid4()))
    postgis.create_schema(owner, schema)
    schemas.append(schema)
    layer = postgis.LayerTable(schema, table, inputs.attributes, SRID, "Point")
    postgis.create_layer_table(owner, layer)
    return layer


def _ours(inputs: Inputs, layer: postgis.LayerTable, parallelism: int) -> None:
    sources = [(span, partial(read_parquet_table, blob)) for span, blob in inputs.chunks]
    rows = postgis.load_layer_chunks(inputs.settings, layer, sources, parallelism=parallelism)
    assert rows == POINTS


def _copy_into(layer: postgis.LayerTable) -> str:
    return (f'COPY "{layer.schema}"."{layer.table}" (_row_id, point_id, value, category, geom) '
            "FROM STDIN (FORMAT BINARY)")


def _bare_copy_loop(inputs: Inputs, layer: postgis.LayerTable) -> None:
    with connect(inputs.settings) as conn:
        with conn.cursor().copy(_copy_into(layer)) as copy:
            copy.set_types(["int8", "int8", "float8", "text", "bytea"])
            for row in inputs.rows:
                copy.write_row(row)
        conn.commit()


def _prebuilt_stream(inputs: Inputs, layer: postgis.LayerTable) -> None:
    view = memoryview(inputs.stream)
    with connect(inputs.settings) as conn:
        with conn.cursor().copy(_copy_into(layer)) as copy:
            for at in range(0, len(view), copy_binary.DEFAULT_BLOCK_BYTES):
                copy.write(view[at:at + copy_binary.DEFAULT_BLOCK_BYTES])
        conn.commit()


def _ogr2ogr(inputs: Inputs, layer: postgis.LayerTable) -> None:
    s = inputs.settings
    target = f"PG:host={s.host} port={s.port} user={s.user} dbname={s.dbname}"
    subprocess.run(
        ["ogr2ogr", "-f", "PostgreSQL", target, str(inputs.fgb), "-nln", layer.table,
         "-lco", f"SCHEMA={layer.schema}", "-lco", "GEOMETRY_NAME=geom",
         "-lco", "SPATIAL_INDEX=NONE", "-lco", "UNLOGGED=ON", "-nlt", "POINT",
         "--config", "PG_USE_COPY", "YES"],
        check=True, env={**os.environ, "PGPASSWORD": s.password}, capture_output=True)


def _to_postgis(inputs: Inputs, layer: postgis.LayerTable) -> None:
    from sqlalchemy import URL, create_engine

    s = inputs.settings
    engine = create_engine(URL.create("postgresql+psycopg", s.user, s.password, s.host, s.port,
                                      s.dbname))
    try:
        inputs.frame.to_postgis(layer.table, engine, schema=layer.schema, index=False)
    finally:
        engine.dispose()


@pytest.mark.benchmark(group="load")
@pytest.mark.parametrize("case", CASES)
def test_load(benchmark, inputs, owner, case):
    schemas: list[str] = []
    layers: list[postgis.LayerTable] = []
    own_table = case.startswith("ours") or case in ("bare_copy_loop", "prebuilt_stream")

    def setup():
        if own_table:
            layers.append(_fresh_layer(owner, schemas, inputs, "points"))
        else:  # ogr2ogr and to_postgis create their own table in a fresh schema
            schema = postgis.run_schema_name(str(uuid.uuid4()))
            postgis.create_schema(owner, schema)
            schemas.append(schema)
            layers.append(postgis.LayerTable(schema, "points", inputs.attributes, SRID))
        return (layers[-1],), {}

    runners = {"bare_copy_loop": partial(_bare_copy_loop, inputs),
               "prebuilt_stream": partial(_prebuilt_stream, inputs),
               "ogr2ogr": partial(_ogr2ogr, inputs), "to_postgis": partial(_to_postgis, inputs),
               "ours-p1": partial(_ours, inputs, parallelism=1),
               "ours-p2": partial(_ours, inputs, parallelism=2)}
    rounds = 1 if case == "to_postgis" else ROUNDS
    try:
        benchmark.pedantic(runners[case], setup=setup, rounds=rounds, iterations=1)
        geom = "geometry" if case == "to_postgis" else "geom"  # to_postgis keeps the frame's
        for layer in layers:
            count = owner.execute(f'SELECT count(*), ST_SRID(min("{geom}")) FROM '
                                  f'"{layer.schema}"."{layer.table}"').fetchone()
            assert count == (POINTS, SRID), (case, count)
            if case.startswith("ours"):
                assert owner.execute(f'SELECT count(DISTINCT _row_id) FROM '
                                     f'"{layer.schema}"."{layer.table}"').fetchone()[0] == POINTS
    finally:
        for schema in schemas:
            postgis.drop_schema(owner, schema)
    stats = benchmark.stats.stats
    rows_per_s = POINTS / stats.min
    _rows_per_s[case] = rows_per_s
    benchmark.extra_info["rows_per_s"] = round(rows_per_s)
    benchmark.extra_info["rows_per_s_median"] = round(POINTS / stats.median)
    benchmark.extra_info["points"] = POINTS
    if case == "ours-p2":
        if "ogr2ogr" in _rows_per_s:
            summary.record_ratio("load_vs_ogr2ogr", rows_per_s / _rows_per_s["ogr2ogr"], target=4.0,
                                 note=f"2 connections, best rounds, {summary.size_label(POINTS)} points")
        if "bare_copy_loop" in _rows_per_s:
            summary.record_ratio("load_vs_bare_copy_loop", rows_per_s / _rows_per_s["bare_copy_loop"],
                                 target=0.8, note="2 connections, best rounds")
    if case.startswith("ours"):
        for other, key in (("ogr2ogr", "ratio_vs_ogr2ogr"), ("bare_copy_loop", "ratio_vs_bare_loop"),
                           ("prebuilt_stream", "ratio_vs_prebuilt_stream"),
                           ("to_postgis", "ratio_vs_to_postgis")):
            if other in _rows_per_s:
                benchmark.extra_info[key] = round(rows_per_s / _rows_per_s[other], 3)
    if case == CASES[-1]:
        print("\nload, best of rounds: " + ", ".join(
            f"{name} {value:,.0f} rows/s" for name, value in _rows_per_s.items()))
        if {"ogr2ogr", "bare_copy_loop"} <= _rows_per_s.keys():
            print(f"ours-p2 vs ogr2ogr {rows_per_s / _rows_per_s['ogr2ogr']:.2f}x (target >= 4), "
                  f"vs bare loop {rows_per_s / _rows_per_s['bare_copy_loop']:.2f}x (target >= 0.8)")
