"""Load + join op: COPY the layers into the run's transient schema, join, stream the result out.

The schema lives exactly as long as this op: it is created here and dropped in ``finally``
whatever happens, so a re-execution from a later step never depends on it. A run killed
outright is caught by the schema janitor sensor.
"""

import hashlib
import time

import geopandas as gpd
import pyarrow as pa
from dagster import OpExecutionContext, Out, op
from pydantic import BaseModel, ConfigDict
from pyproj import CRS

from etl_pipelines.ops.validate import BatchPlan
from etl_pipelines.resources import ObjectStoreResource, PostGISResource
from libs import postgis, postgis_join, postgis_load
from libs.chunk_index import ChunkIndex
from libs.errors import LoadError, ReconciliationError
from libs.geoparquet import GEOMETRY, read_parquet_table, to_geoparquet_bytes
from libs.lake import StagedPart


class JoinResult(BaseModel):
    """The join result, staged as GeoParquet parts."""

    model_config = ConfigDict(frozen=True)

    name: str
    rows: int
    parts: list[StagedPart]
    columns: list[str]
    crs: str


def _srid(target_crs: str) -> int:
    epsg = CRS.from_user_input(target_crs).to_epsg()
    if epsg is None:
        raise LoadError(f"target_crs {target_crs!r} has no EPSG code; PostGIS needs an SRID")
    return epsg


@op(out=Out(JoinResult), tags={"stage": "load"})
def load_and_join(
    context: OpExecutionContext, plan: BatchPlan, transformed: ChunkIndex,
    object_store: ObjectStoreResource, postgis_db: PostGISResource,
) -> JoinResult:
    store = object_store.store
    staging = object_store.staging_bucket
    join = plan.manifest.join
    schema = postgis.run_schema_name(context.run_id)
    srid = _srid(plan.manifest.target_crs)
    tables: dict[str, postgis_load.LayerTable] = {}
    with postgis_db.connect() as conn:
        try:
            postgis.create_schema(conn, schema)
            context.log.info(f"created transient schema {schema}")
            load_started = time.monotonic()
            for layer in transformed.layers:
                table = None
                for chunk in layer.chunks:
                    arrow = read_parquet_table(store.get_bytes(staging, chunk.key))
                    if table is None:
                        table = postgis_load.LayerTable(
                            schema, layer.layer, postgis_load.attribute_schema(arrow), srid,
                            postgis_load.column_geometry_type(
                                transformed.geometry_types.get(layer.layer, [])))
                        postgis_load.create_layer_table(conn, table)
                    postgis_load.copy_chunk_into_table(conn, table, arrow, chunk.id_span)
                postgis_load.index_and_analyze(conn, table)
                loaded = postgis.count_rows(conn, schema, layer.layer)
                if loaded != layer.rows:
                    raise ReconciliationError(
                        f"layer {layer.layer!r}: {layer.rows} rows transformed but {loaded} loaded")
                tables[layer.layer] = table
                context.log.info(f"loaded layer {layer.layer}: {loaded} rows")
            load_seconds = time.monotonic() - load_started
            join_started = time.monotonic()
            result = postgis_join.run_spatial_join(conn, join, tables[join.left], tables[join.right])
            parts: list[StagedPart] = []
            rows = 0
            for number, batch in enumerate(postgis_join.stream_table(conn, result)):
                data = _encode(batch, plan.manifest.target_crs)
                key = f"{plan.staging_prefix}results/{join.name}/part-{number:05d}.parquet"
                store.put_bytes(staging, key, data, "application/vnd.apache.parquet")
                parts.append(StagedPart(key, batch.num_rows, len(data),
                                        hashlib.sha256(data).hexdigest()))
                rows += batch.num_rows
            join_seconds = time.monotonic() - join_started
            expected = postgis.count_rows(conn, schema, tables[join.left].table) \
                if join.how == "left" else rows
            if rows != expected:
                raise ReconciliationError(
                    f"join {join.name!r}: a left join must keep all {expected} left rows, got {rows}")
        finally:
            conn.rollback()
            postgis.drop_schema(conn, schema)
            context.log.info(f"dropped transient schema {schema}")
    loaded_rows = transformed.rows
    context.add_output_metadata({
        "rows": rows,
        "loaded_rows": loaded_rows,
        "load_rows_per_second": round(loaded_rows / load_seconds, 1) if load_seconds else 0.0,
        "join_seconds": round(join_seconds, 3),
        "predicate": join.predicate,
        "postgis_schema": schema,
    })
    return JoinResult(name=join.name, rows=rows, parts=parts,
                      columns=[*result.attributes.names, "geometry"], crs=plan.manifest.target_crs)


def _encode(batch: pa.Table, crs: str) -> bytes:
    frame = gpd.GeoDataFrame(
        batch.drop_columns([GEOMETRY]).to_pandas(),
        geometry=gpd.GeoSeries.from_wkb(batch.column(GEOMETRY).to_numpy(zero_copy_only=False),
                                        crs=crs),
    )
    return to_geoparquet_bytes(frame)
