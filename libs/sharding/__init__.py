"""Shard stage: any landed vector dataset -> spatially ordered, bounded GeoParquet chunks.

What this package owns
----------------------
* Reading every input format of the manifest as a stream of Arrow record batches: GDAL
  formats through pyogrio's Arrow reader (``pyogrio.raw.open_arrow``), GeoParquet 1.0/1.1
  through ``pyarrow.parquet.ParquetFile.iter_batches``. No file is ever loaded whole.
* Checking what was landed before trusting it: zip archives (member names, inflated size,
  compression ratio) from the central directory before GDAL touches them, the driver GDAL
  detects against the declared format, CRS (manifest vs file, and across a layer's files),
  text encodings, coordinates, geometry families and column agreement. Every problem is an
  :class:`~libs.errors.InputDataError` naming the file, the layer and what was expected.
  Input files are only read, never written.
* Ordering a whole layer (all files feeding it) along a Hilbert curve and cutting it into
  GeoParquet 1.1 chunks bounded by rows and bytes, so each chunk covers a compact area.

Algorithm
---------
The sort key of a row is the Hilbert index (2^32 cells per axis, a 64-bit key, computed
with 8-bit lookup tables in numpy) of the centre of its geometry's bbox, normalised to the
layer's extent of centres with one scale for both axes. Every sort is stable and rows enter
it in source order (file by file, row by row), so ties keep source order, rows without a
geometry come last, and the output is deterministic.

1. Read: stream each source in ``read_batch_rows`` batches (GDAL decodes the next batch on
   a helper thread meanwhile); bboxes come straight from point WKB (strided numpy views, no
   parsing), from a numpy walk of plain line and polygon WKB (``libs.wkb_layout``), or from
   shapely otherwise; rows are validated; bounds and a geometry-type code
   are added as columns; the extent and a fixed-size random sample of centres are tracked.
   A layer that fits in half of ``sort_memory_bytes`` stays in memory; a larger one (or one
   whose files are already larger) goes to Arrow IPC files in ``scratch_dir`` (64 MiB each,
   per source).
2. In memory: compute keys, ``argsort`` them, cut chunks by gathering rows. External:
   stream the spill files once more, compute keys and range-partition the rows (on
   ``encode_threads`` threads, a few batches ahead, appended in spill order) into K
   bucket files, at key boundaries taken from quantiles of the sampled keys (so clustered
   data still gives even buckets), with K such that a bucket is ~1/8 of the budget (<= 256).
3. Load one bucket at a time, sort it and cut chunks, carrying the unfinished chunk over to
   the next bucket so chunk boundaries do not depend on K (the external sort gives the same
   bytes as the in-memory one). A bucket over half the budget (skewed or duplicated keys) is
   re-partitioned on its own key quantiles, recursively; a bucket whose rows all share one
   key is already in order and is streamed straight out.

Chunks are cut where either ``chunk_rows`` or ``chunk_bytes`` (estimated from the Arrow
size of the rows, which zstd Parquet does not exceed in practice) would be exceeded; a
chunk whose encoding still exceeds ``chunk_bytes`` is split in half. Chunks are written
with pyarrow directly (zstd, ``geo`` metadata with the CRS as PROJJSON, geometry_types and
bbox; no covering column: the transform, their only reader, adds it to its output);
``encode_threads`` threads gather and
encode chunks while the next one is cut; ``sink`` is called from the calling thread, in order.

Memory (measured in ``benchmarks/README.md``): the interpreter and libraries, plus at most
half of ``sort_memory_bytes`` of rows (the in-memory layer, or about a quarter of that for
the bucket being sorted), plus ``encode_threads`` chunks being gathered and encoded, plus
two read batches. None of it grows with the input, which only sets the number of buckets
and the scratch disk used (about the input's Arrow size: the partition pass deletes each
spill file once read, as its buckets grow).

Modules
-------
* ``limits``: :class:`ShardLimits`, the stage's bounds.
* ``sources``: :class:`LayerSource` and how messages name a source.
* ``inputs``: :func:`plan_layers` and the checks made before any feature is read (zip
  safety, driver detection, layers, CSV columns); ``crs``: the CRS checks.
* ``readers``: a source as a stream of normalised Arrow batches; ``wkb``: geometry types,
  bounds and validation from WKB; ``schema``: column agreement across a layer's files.
* ``collect``: pass 1 (read, validate, spill); ``hilbert``: the curve and its grid;
  ``external_sort``: passes 2 and 3; ``writer``: chunk cutting and GeoParquet encoding;
  ``shard``: :func:`shard_layer`, which runs them.

Why not dask-geopandas
----------------------
dask-geopandas is in the stack, and was considered for the ordering: its
``spatial_shuffle`` is ``set_index`` on ``hilbert_distance``. It does not fit here:
``hilbert_distance`` works at level <= 16 and refuses empty or missing geometries; the
distances are computed eagerly to find divisions (a full extra read); on the local
scheduler the shuffle holds every partition in memory (spilling to disk needs
``dask.distributed`` workers, a second cluster beside Ray inside the run worker); and
``dask_geopandas.read_file`` partitions with ``skip_features``, which re-scans from the
start for drivers without random access (GeoJSON, CSV, zipped Shapefiles). An external
sort over Arrow IPC files needs no scheduler, reads the input once, and keeps memory flat.
"""

from libs.sharding.hilbert import hilbert_index
from libs.sharding.inputs import normalised_layer_name, plan_layers
from libs.sharding.limits import ShardLimits
from libs.sharding.shard import ShardedLayer, shard_layer
from libs.sharding.sources import LayerSource
from libs.sharding.writer import ChunkSink

__all__ = [
    "ChunkSink",
    "LayerSource",
    "ShardLimits",
    "ShardedLayer",
    "hilbert_index",
    "normalised_layer_name",
    "plan_layers",
    "shard_layer",
]
