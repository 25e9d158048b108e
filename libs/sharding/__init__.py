"""Shard stage: any landed vector dataset -> spatially ordered, bounded GeoParquet chunks.

The package owns three things. Reading every input format of the manifest as a stream of
Arrow batches (GDAL formats through pyogrio's Arrow reader, GeoParquet through pyarrow), so
no file is ever loaded whole. Checking what was landed before trusting it (zip safety, the
driver GDAL detects, CRS, encodings, coordinates, geometry families, columns), each problem
an :class:`~libs.errors.InputDataError` naming the file and layer; GDAL locked down first
(:func:`lock_down_gdal`: the declared formats' drivers only, no network). And ordering a whole
layer along a Hilbert curve, cut into chunks bounded by rows and bytes, so that each chunk
covers a compact area for the transform, the load and the lake's readers.

The order comes from an external sort over Arrow IPC files (read and spill, range-partition
at sampled key quantiles, sort one bucket at a time) rather than dask-geopandas' spatial
shuffle: it needs no scheduler, reads the input once, keeps memory flat (bounded by
:class:`ShardLimits`, not by the input) and gives the same bytes as an in-memory sort.

Entry points: :func:`plan_layers` checks every landed file and groups the sources by layer;
:func:`shard_layer` shards one layer into a :data:`ChunkSink`. How the sort works, the
modules' jobs and the measurements behind the design: ``docs/sharding.md``.
"""

from libs.sharding.batch import LandedFile, download_landed, shard_landed_batch
from libs.sharding.gdal_guard import (
    ALLOWED_DRIVERS,
    GdalLockdownError,
    check_gdal_locked_down,
    lock_down_gdal,
)
from libs.sharding.hilbert import hilbert_index
from libs.sharding.inputs import normalised_layer_name, plan_layers
from libs.sharding.limits import ShardLimits
from libs.sharding.scratch import check_scratch_space, remove_dead_scratch, run_scratch
from libs.sharding.shard import ShardedLayer, shard_layer
from libs.sharding.sources import LayerSource
from libs.sharding.writer import ChunkSink

__all__ = [
    "ALLOWED_DRIVERS",
    "ChunkSink",
    "GdalLockdownError",
    "LandedFile",
    "LayerSource",
    "ShardLimits",
    "ShardedLayer",
    "check_gdal_locked_down",
    "check_scratch_space",
    "download_landed",
    "hilbert_index",
    "lock_down_gdal",
    "normalised_layer_name",
    "plan_layers",
    "remove_dead_scratch",
    "run_scratch",
    "shard_landed_batch",
    "shard_layer",
]
