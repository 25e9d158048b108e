"""One pipeline run on one batch, in a fresh interpreter: ours (the real Dagster job) or a peer.

``bench_pipelines.py`` starts ``python -m benchmarks.pipelines NAME SPEC_JSON`` per case, so
each pipeline pays its own imports outside the timing and its memory is measured alone. The
child talks on its original stdout (everything the libraries print goes to stderr), one JSON
line per event, each prefixed ``BENCH``:

1. ``ready``: imports done and inputs prepared (ours: the batch is landed, the object store
   compacted, Ray connected, the sensor cursor built); carries ``ray_job_id`` where there is
   one;
2. it waits for ``go`` on stdin, runs the work and reports ``timed`` with per-stage seconds;
3. untimed: ``check`` with what it produced (row counts per layer, join rows and totals),
   read back from its outputs; then it drops its scratch schema / lake objects and exits.

Every pipeline does the same work on the same landed files: points, lines and polygons
(FlatGeobuf, EPSG:3857) and the Natural Earth countries (zipped Shapefile, EPSG:4326) are
reprojected to EPSG:8857 and made valid; countries are joined with the points (intersects,
left: count, sum and mean of ``value`` per country); every layer and the join result end as
GeoParquet. Stages reported: ``lake`` (landed files → transformed layers), ``postgis``
(load + join; in memory for the pipelines without PostGIS), ``export``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TARGET = "EPSG:8857"
SRID = 8857
LAYERS = ("points", "lines", "polygons")
JOIN = {
    "name": "points_per_country", "left": "countries", "right": "points",
    "predicate": "intersects", "how": "left",
    "aggregations": [{"function": "count", "output": "point_count"},
                     {"function": "sum", "column": "value", "output": "value_sum"},
                     {"function": "mean", "column": "value", "output": "value_mean"}],
}


class Protocol:
    def __init__(self) -> None:
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)  # library output must not interleave with ours

    def say(self, event: str, **data) -> None:
        self._out.write("BENCH " + json.dumps({"event": event, **data}) + "\n")
        self._out.flush()

    def wait_for_go(self) -> None:
        line = sys.stdin.readline()
        if line.strip() != "go":
            raise SystemExit(f"expected 'go' on stdin, got {line!r}")


def stack_env() -> dict[str, str]:
    from devstack.envfile import read_env_file
    from devstack.layout import ENV_FILE

    env = read_env_file(ENV_FILE)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return env


def compact_object_store(env: dict[str, str]) -> None:
    """Have the local SeaweedFS rewrite its volumes without the objects deleted since.

    SeaweedFS keeps deleted objects until a vacuum, and a store grown by earlier cases made
    later runs slower; MinIO frees them at once, so the bench pays that cost here, before
    timing (see docs/benchmark-methods.md). The store of the compose stack (no
    ``SEAWEEDFS_MASTER_URL``) is left alone.
    """
    import urllib.request

    master = env.get("SEAWEEDFS_MASTER_URL")
    if not master:
        return
    # synchronous: the master answers once the volumes over the threshold are rewritten
    with urllib.request.urlopen(f"{master}/vol/vacuum?garbageThreshold=0.01", timeout=600) as resp:
        resp.read()


def postgis_settings():
    from libs.postgis import PostGISSettings

    env = stack_env()
    return PostGISSettings(env["POSTGRES_HOST"], int(env["POSTGRES_PORT"]), env["POSTGRES_USER"],
                           env["POSTGRES_PASSWORD"], env.get("POSTGRES_DB", "spatial_compute"))


def join_totals(frame) -> dict:
    return {"join_rows": int(len(frame)), "point_count": int(frame["point_count"].sum()),
            "value_sum": round(float(frame["value_sum"].fillna(0).sum()), 3)}


def parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


# ---------------------------------------------------------------------------- ours


class Ours:
    """The ``ingest_batch`` job through Dagster, from the landed batch to the published lake."""

    def __init__(self, spec: dict):
        import ray
        from dagster import DagsterInstance

        from devstack.s3 import store_settings
        from etl_pipelines.resources.ray import RayResource
        from libs.landing import land_batch
        from libs.object_store import ObjectStore
        from libs.sample_batch import natural_earth_countries_zip
        from tests.integration.pipeline import cursor_focused_on

        env = stack_env()
        self.batch_id = f"bench-{spec['size']}-{uuid.uuid4().hex[:8]}"
        self.out = Path(spec["out"])
        folder = self.out / self.batch_id
        folder.mkdir(parents=True)
        files = []
        for layer in LAYERS:
            (folder / f"{layer}.fgb").symlink_to(spec["layers"][layer])
            files.append({"path": f"{layer}.fgb", "layer": layer, "format": "flatgeobuf",
                          "source_crs": "EPSG:3857"})
        natural_earth_countries_zip(folder / "countries.zip")
        files.append({"path": "countries.zip", "layer": "countries", "format": "shapefile_zip",
                      "source_crs": "EPSG:4326"})
        manifest = {"manifest_version": 1, "batch_id": self.batch_id, "target_crs": TARGET,
                    "files": files, "join": JOIN}
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
        self.store = ObjectStore(store_settings(env, "pipeline"))
        # only the admin identity deletes in landing-zone (the pipeline never does): cleanup
        self.admin_store = ObjectStore(store_settings(env, "admin"))
        land_batch(ObjectStore(store_settings(env, "landing")), folder, self.batch_id)
        compact_object_store(env)
        self._instance_cm = DagsterInstance.ephemeral()
        self.instance = self._instance_cm.__enter__()
        # connect here, untimed and with our job id known; the job's Ray resource reuses it
        ray.init(address=env["RAY_ADDRESS"], namespace=RayResource.model_fields["namespace"].default,
                 log_to_driver=False)
        self.ray_job_id = ray.get_runtime_context().get_job_id()
        self.cursor = cursor_focused_on(self.store, [self.batch_id])

    def run(self) -> dict[str, float]:
        from dagster import DagsterEventType

        from tests.integration.pipeline import request_for, run_ingest, sensor_tick

        request = request_for(sensor_tick(self.instance, self.cursor), self.batch_id)
        assert request is not None, f"the sensor requested no run for {self.batch_id}"
        chunk_rows = os.environ.get("BENCH_OURS_CHUNK_ROWS")
        if chunk_rows:  # what the sensor's run config leaves at its default (250k)
            config = dict(request.run_config)
            config["ops"] = {**config.get("ops", {}), "shard_batch": {
                "config": {**config.get("ops", {}).get("shard_batch", {}).get("config", {}),
                           "chunk_rows": int(chunk_rows)}}}
            request = request.with_replaced_attrs(run_config=config)
        result = run_ingest(self.instance, request)
        assert result.success
        self.run_id = result.run_id
        started: dict[str, float] = {}
        seconds: dict[str, float] = {}
        entries = self.instance.all_logs(result.run_id)
        # the run's own log beside the bench's output: where a slow run spent its seconds
        first = entries[0].timestamp if entries else 0.0
        (self.out / f"{self.batch_id}-run.log").write_text("".join(
            f"{entry.timestamp - first:8.2f} {entry.step_key or '-':18s} "
            f"{(entry.user_message or '').splitlines()[0] if entry.user_message else ''}\n"
            for entry in entries))
        for entry in entries:
            event = entry.dagster_event
            if event is None or entry.step_key is None:
                continue
            if event.event_type == DagsterEventType.STEP_START:
                started[entry.step_key] = entry.timestamp
            elif event.event_type == DagsterEventType.STEP_SUCCESS:
                seconds[entry.step_key] = entry.timestamp - started[entry.step_key]
        return {"lake": seconds["validate_batch"] + seconds["shard_batch"] + seconds["transform_chunks"],
                "postgis": seconds["load_and_join"], "export": seconds["publish_batch"],
                **{f"step:{k}": v for k, v in seconds.items()}}

    def check(self) -> dict:
        import io

        import pandas as pd
        import pyarrow.parquet as pq

        from libs.lake import read_completion_manifest

        completion = read_completion_manifest(self.store, "data-lake", self.batch_id)
        datasets = completion["datasets"]
        frames = [pq.read_table(io.BytesIO(self.store.get_bytes("data-lake", o["key"])),
                                columns=["point_count", "value_sum"]).to_pandas()
                  for o in datasets[JOIN["name"]]["objects"]]
        return {"rows": {name: datasets[name]["rows"] for name in (*LAYERS, "countries")},
                **join_totals(pd.concat(frames, ignore_index=True))}

    def cleanup(self) -> None:
        from libs.lake import completion_key, dataset_prefix

        for dataset in (*LAYERS, "countries", JOIN["name"]):
            self.store.delete_prefix("data-lake", dataset_prefix(dataset, self.batch_id))
        self.store.delete("data-lake", completion_key(self.batch_id))
        self.admin_store.delete_prefix("landing-zone", f"{self.batch_id}/")
        self._instance_cm.__exit__(None, None, None)


# ---------------------------------------------------------------------------- peers


class Ogr2ogr:
    """ogr2ogr (Debian gdal-bin) into PostGIS with PG_USE_COPY, the join in SQL, then the
    export. Debian's GDAL (3.6) has no (Geo)Parquet or Arrow driver (``ogr2ogr --formats``)
    and pyogrio's bundled GDAL has no PostgreSQL driver, so the export is the least work left
    with GDAL alone: ``ogr2ogr -f FlatGeobuf`` out of PostGIS, then pyogrio reads that as
    Arrow and pyarrow writes GeoParquet. Two ogr2ogr processes run at a time (2 cores)."""

    def __init__(self, spec: dict):
        import pyarrow.parquet  # noqa: F401  (imports outside the timing, as every peer's)
        import pyogrio.raw  # noqa: F401

        from libs.postgis import connect, create_schema, run_schema_name

        self.spec = spec
        self.settings = postgis_settings()
        # a run schema (name and advisory lock): the pipeline's PostGIS role may create no other
        self.schema = run_schema_name(str(uuid.uuid4()))
        self.conn = connect(self.settings, autocommit=True)
        create_schema(self.conn, self.schema)
        s = self.settings
        self.dsn = f"PG:host={s.host} port={s.port} user={s.user} dbname={s.dbname}"
        self.out = Path(spec["out"]) / "ogr2ogr"
        self.out.mkdir(parents=True)

    def _load(self, source: str, table: str, promote: bool) -> None:
        import subprocess

        command = ["ogr2ogr", "-f", "PostgreSQL", self.dsn, source, "-nln", table,
                   "-lco", f"SCHEMA={self.schema}", "-lco", "GEOMETRY_NAME=geom",
                   "-lco", "SPATIAL_INDEX=NONE", "-lco", "UNLOGGED=ON", "-t_srs", TARGET,
                   "-makevalid", "--config", "PG_USE_COPY", "YES"]
        if promote:
            command += ["-nlt", "PROMOTE_TO_MULTI"]
        subprocess.run(command, check=True, capture_output=True,
                       env={**os.environ, "PGPASSWORD": self.settings.password})

    def _export(self, table: str) -> None:
        import subprocess

        import pyarrow.parquet as pq
        from pyogrio.raw import open_arrow

        staged = self.out / f"{table}.fgb"
        subprocess.run(["ogr2ogr", "-f", "FlatGeobuf", str(staged), self.dsn, f"{self.schema}.{table}",
                        "-lco", "SPATIAL_INDEX=NO"], check=True, capture_output=True,
                       env={**os.environ, "PGPASSWORD": self.settings.password})
        with open_arrow(staged, use_pyarrow=True) as (meta, reader):
            schema = reader.schema.with_metadata({b"geo": ogr_geo_metadata(meta)})
            with pq.ParquetWriter(self.out / f"{table}.parquet", schema, compression="zstd") as writer:
                for batch in reader:
                    writer.write_batch(batch)
        staged.unlink()

    def run(self) -> dict[str, float]:
        started = time.monotonic()
        sources = [(self.spec["layers"][layer], layer, layer == "polygons") for layer in LAYERS]
        sources.append((f"/vsizip/{self.spec['countries']}", "countries", True))
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda s: self._load(*s), sources))
        q = f'"{self.schema}"'
        self.conn.execute(f"CREATE INDEX ON {q}.points USING gist (geom)")
        self.conn.execute(f"ANALYZE {q}.points")
        self.conn.execute(
            f"CREATE UNLOGGED TABLE {q}.{JOIN['name']} AS SELECT c.*, count(p.value) AS point_count, "
            f"sum(p.value) AS value_sum, avg(p.value) AS value_mean FROM {q}.countries c "
            f"LEFT JOIN {q}.points p ON ST_Intersects(c.geom, p.geom) GROUP BY c.ogc_fid")
        joined = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(self._export, [*LAYERS, "countries", JOIN["name"]]))
        return {"postgis": joined - started, "export": time.monotonic() - joined}

    def check(self) -> dict:
        import pandas as pd

        rows = {name: parquet_rows(self.out / f"{name}.parquet") for name in (*LAYERS, "countries")}
        frame = pd.read_parquet(self.out / f"{JOIN['name']}.parquet", columns=["point_count", "value_sum"])
        return {"rows": rows, **join_totals(frame)}

    def cleanup(self) -> None:
        self.conn.execute(f'DROP SCHEMA "{self.schema}" CASCADE')
        self.conn.close()


def ogr_geo_metadata(meta: dict) -> bytes:
    """The least GeoParquet ``geo`` metadata for what pyogrio's ``open_arrow`` reads (its
    ``meta``): the ogr2ogr peer writes it beside the Arrow batches."""
    geometry = meta["geometry_name"] or "wkb_geometry"
    geo = {"version": "1.1.0", "primary_column": geometry,
           "columns": {geometry: {"encoding": "WKB", "geometry_types": [],
                                  "crs": json.loads(_projjson(meta["crs"]))}}}
    return json.dumps(geo).encode()


def _projjson(crs_text: str) -> str:
    from pyproj import CRS

    return CRS.from_user_input(crs_text).to_json()


def _read_countries(spec: dict):
    import pyogrio

    return pyogrio.read_dataframe(spec["countries"], use_arrow=True)


def _join_in_memory(countries, points):
    """Countries (left) with count, sum and mean of the points' value, geopandas sjoin."""
    import geopandas as gpd

    pairs = gpd.sjoin(points[["value", "geometry"]], countries[["geometry"]], predicate="intersects")
    stats = pairs.groupby("index_right")["value"].agg(["count", "sum", "mean"])
    joined = countries.join(stats.rename(columns={"count": "point_count", "sum": "value_sum",
                                                  "mean": "value_mean"}))
    joined["point_count"] = joined["point_count"].fillna(0).astype("int64")
    return joined


class Geopandas:
    """Serial geopandas: read, to_crs, make_valid, to_postgis, sjoin, to_parquet."""

    def __init__(self, spec: dict):
        import geopandas  # noqa: F401  (imports outside the timing)
        from sqlalchemy import URL, create_engine

        from libs.postgis import connect, create_schema, run_schema_name

        self.spec = spec
        s = postgis_settings()
        # a run schema (name and advisory lock): the pipeline's PostGIS role may create no other
        self.schema = run_schema_name(str(uuid.uuid4()))
        self.conn = connect(s, autocommit=True)
        create_schema(self.conn, self.schema)
        self.engine = create_engine(URL.create("postgresql+psycopg", s.user, s.password, s.host, s.port,
                                               s.dbname))
        self.out = Path(spec["out"]) / "geopandas"
        self.out.mkdir(parents=True)

    def run(self) -> dict[str, float]:
        import pyogrio

        started = time.monotonic()
        frames = {layer: pyogrio.read_dataframe(self.spec["layers"][layer], use_arrow=True)
                  for layer in LAYERS}
        frames["countries"] = _read_countries(self.spec)
        for name, frame in frames.items():
            frame = frame.to_crs(TARGET)
            frame["geometry"] = frame.geometry.make_valid()
            frames[name] = frame
        transformed = time.monotonic()
        for name, frame in frames.items():
            frame.to_postgis(name, self.engine, schema=self.schema, index=False)
        joined = _join_in_memory(frames["countries"], frames["points"])
        loaded = time.monotonic()
        for name, frame in frames.items():
            frame.to_parquet(self.out / f"{name}.parquet")
        joined.to_parquet(self.out / f"{JOIN['name']}.parquet")
        return {"lake": transformed - started, "postgis": loaded - transformed,
                "export": time.monotonic() - loaded}

    def check(self) -> dict:
        import pandas as pd

        rows = {name: parquet_rows(self.out / f"{name}.parquet") for name in (*LAYERS, "countries")}
        in_db = self.conn.execute(f'SELECT count(*) FROM "{self.schema}".points').fetchone()[0]
        assert in_db == rows["points"], (in_db, rows)
        frame = pd.read_parquet(self.out / f"{JOIN['name']}.parquet", columns=["point_count", "value_sum"])
        return {"rows": rows, **join_totals(frame)}

    def cleanup(self) -> None:
        self.conn.execute(f'DROP SCHEMA "{self.schema}" CASCADE')
        self.conn.close()
        self.engine.dispose()


class DaskGeopandas:
    """dask-geopandas: read_file with partitions, to_crs, make_valid, to_parquet, sjoin (on the
    written points), groupby, the join result to_parquet. Dask's default (threaded) scheduler
    on this machine's cores; no PostGIS."""

    def __init__(self, spec: dict):
        import dask_geopandas  # noqa: F401  (imports outside the timing)

        self.spec = spec
        self.out = Path(spec["out"]) / "dask_geopandas"
        self.out.mkdir(parents=True)

    def run(self) -> dict[str, float]:
        import dask
        import dask_geopandas

        started = time.monotonic()
        layers = {layer: self.spec["layers"][layer] for layer in LAYERS}
        layers["countries"] = self.spec["countries"]
        writes = []
        for name, path in layers.items():
            parts = max(2, self.spec["size"] // 250_000) if name != "countries" else 1
            frame = dask_geopandas.read_file(path, npartitions=parts).to_crs(TARGET)
            frame = frame.map_partitions(lambda f: f.set_geometry(f.geometry.make_valid()))
            writes.append(frame.to_parquet(self.out / name, compute=False))
        dask.compute(*writes)
        transformed = time.monotonic()
        points = dask_geopandas.read_parquet(self.out / "points", columns=["value", "geometry"])
        countries = dask_geopandas.read_parquet(self.out / "countries").compute()
        countries = countries.reset_index(drop=True)
        pairs = dask_geopandas.sjoin(points, dask_geopandas.from_geopandas(countries[["geometry"]],
                                                                           npartitions=1),
                                     predicate="intersects")
        stats = pairs.groupby("index_right")["value"].agg(["count", "sum"]).compute()
        stats["mean"] = stats["sum"] / stats["count"]
        joined = countries.join(stats.rename(columns={"count": "point_count", "sum": "value_sum",
                                                      "mean": "value_mean"}))
        joined["point_count"] = joined["point_count"].fillna(0).astype("int64")
        joined.to_parquet(self.out / f"{JOIN['name']}.parquet")
        return {"lake": transformed - started, "postgis": time.monotonic() - transformed}

    def check(self) -> dict:
        import pandas as pd

        rows = {name: parquet_rows(self.out / name) for name in (*LAYERS, "countries")}
        frame = pd.read_parquet(self.out / f"{JOIN['name']}.parquet", columns=["point_count", "value_sum"])
        return {"rows": rows, **join_totals(frame)}

    def cleanup(self) -> None:
        pass


class SedonaDB:
    """SedonaDB: read, ST_Transform (+ ST_MakeValid), GeoParquet out, join, GeoParquet; no PostGIS."""

    def __init__(self, spec: dict):
        import sedonadb

        self.spec = spec
        self.con = sedonadb.connect()
        self.out = Path(spec["out"]) / "sedonadb"
        self.out.mkdir(parents=True)

    def run(self) -> dict[str, float]:
        started = time.monotonic()
        sources = {layer: self.spec["layers"][layer] for layer in LAYERS}
        sources["countries"] = self.spec["countries"]
        for name, path in sources.items():
            self.con.read_pyogrio(str(path)).to_view(f"{name}_src")
            columns = [c for c in self.con.sql(f"SELECT * FROM {name}_src LIMIT 0").columns
                       if c != "wkb_geometry"]
            self.con.sql(f"SELECT {', '.join(columns)}, "
                         f"ST_MakeValid(ST_Transform(wkb_geometry, '{TARGET}')) AS geometry "
                         f"FROM {name}_src").to_parquet(self.out / f"{name}.parquet")
        transformed = time.monotonic()
        self.con.read_parquet(str(self.out / "points.parquet")).to_view("p")
        self.con.read_parquet(str(self.out / "countries.parquet")).to_view("c")
        self.con.sql(
            "SELECT c.name, c.iso_a3, c.continent, c.pop_est, c.gdp_md_est, c.geometry, "
            "count(p.value) AS point_count, sum(p.value) AS value_sum, avg(p.value) AS value_mean "
            "FROM c LEFT JOIN p ON ST_Intersects(c.geometry, p.geometry) "
            "GROUP BY c.name, c.iso_a3, c.continent, c.pop_est, c.gdp_md_est, c.geometry"
        ).to_parquet(self.out / f"{JOIN['name']}.parquet")
        return {"lake": transformed - started, "postgis": time.monotonic() - transformed}

    def check(self) -> dict:
        import pandas as pd

        rows = {name: parquet_rows(self.out / f"{name}.parquet") for name in (*LAYERS, "countries")}
        frame = pd.read_parquet(self.out / f"{JOIN['name']}.parquet", columns=["point_count", "value_sum"])
        return {"rows": rows, **join_totals(frame)}

    def cleanup(self) -> None:
        pass


PIPELINES = {"ours": Ours, "ogr2ogr": Ogr2ogr, "geopandas": Geopandas, "dask_geopandas": DaskGeopandas,
             "sedonadb": SedonaDB}


def main(argv: list[str]) -> None:
    protocol = Protocol()
    name, spec = argv[0], json.loads(argv[1])
    stack_env()  # before Ray is imported: it reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import
    pipeline = PIPELINES[name](spec)
    try:
        protocol.say("ready", ray_job_id=getattr(pipeline, "ray_job_id", None))
        protocol.wait_for_go()
        stages = pipeline.run()
        protocol.say("timed", stages=stages)
        protocol.say("check", check=pipeline.check())
    finally:
        pipeline.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
