"""The PostGIS stage: a run's transient schema, its typed layer tables, the parallel binary
COPY of staged chunks into them, the spatial join, and the export of the result.

Modules, in the order a run uses them: ``connection`` (settings, run schemas), ``tables``
(types, tables, indexes), ``copy_binary`` (COPY encoding), ``load`` (COPY of chunks),
``join_sql`` and ``join`` (the join), ``export`` (streaming a result out as GeoParquet), and
``batch``, which runs them for one batch.
"""

from libs.postgis.batch import (
    MAX_TABLE_COLUMNS,
    JoinedBatch,
    JoinOutput,
    join_load_problem,
    load_and_join,
    loaded_columns,
    srid_of,
)
from libs.postgis.connection import (
    GEOM,
    ROW_ID,
    PostGISSettings,
    connect,
    connection_parameters,
    count_rows,
    create_schema,
    drop_schema,
    list_run_schemas,
    run_id_of_schema,
    run_schema_name,
    schema_in_use,
)
from libs.postgis.export import export_table, stream_table
from libs.postgis.join import reconcile_join, run_spatial_join, spatial_index_for
from libs.postgis.load import ChunkLoaded, ChunkSource, copy_chunk_into_table, load_layer_chunks
from libs.postgis.tables import (
    ANY_DIMENSION,
    BRIN_PAGES_PER_RANGE,
    LayerTable,
    attribute_schema,
    column_geometry_type,
    create_layer_table,
    index_and_analyze,
)

__all__ = [
    "ANY_DIMENSION",
    "BRIN_PAGES_PER_RANGE",
    "GEOM",
    "ROW_ID",
    "ChunkLoaded",
    "ChunkSource",
    "MAX_TABLE_COLUMNS",
    "JoinOutput",
    "JoinedBatch",
    "LayerTable",
    "PostGISSettings",
    "attribute_schema",
    "column_geometry_type",
    "connect",
    "connection_parameters",
    "copy_chunk_into_table",
    "count_rows",
    "create_layer_table",
    "create_schema",
    "drop_schema",
    "export_table",
    "index_and_analyze",
    "list_run_schemas",
    "load_and_join",
    "loaded_columns",
    "join_load_problem",
    "load_layer_chunks",
    "reconcile_join",
    "run_id_of_schema",
    "run_schema_name",
    "run_spatial_join",
    "schema_in_use",
    "spatial_index_for",
    "srid_of",
    "stream_table",
]
