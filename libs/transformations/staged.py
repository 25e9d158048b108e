"""Transform a chunk that lives in object storage: the body of one Ray task.

Paths travel, data does not: the task reads its input chunk and writes its output (and,
only when a row was rejected, its rejects) itself, so the Ray object store carries only
these small arguments and the TransformedChunk it returns. No Ray import here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from libs.descriptors import Chunk, TransformedChunk
from libs.errors import ReconciliationError, TransformError
from libs.manifest.recipe import RecipeStep
from libs.object_store import ObjectStore, ObjectStoreSettings
from libs.transformations.chunk import transform_chunk_bytes

PARQUET = "application/vnd.apache.parquet"


def transform_staged_chunk(
    settings: ObjectStoreSettings, bucket: str, chunk: Chunk, out_key: str, rejects_key: str,
    steps: Sequence[RecipeStep], target_crs: str,
) -> TransformedChunk:
    """Read ``chunk``, run the recipe, write the output to ``out_key`` and any rejects to
    ``rejects_key``; returns both as Chunks (the rejects in the input's CRS).

    Errors name the layer, the chunk and its key. The input's sha256 and row count are
    checked against ``chunk`` first, so a chunk changed since sharding is not transformed.
    """
    where = f"layer {chunk.layer!r}, chunk {chunk.ordinal} ({chunk.key})"
    store = ObjectStore(settings)
    data = store.get_bytes(bucket, chunk.key)
    if hashlib.sha256(data).hexdigest() != chunk.sha256:
        raise TransformError(f"{where}: the object's sha256 is not the one sharding recorded; "
                             "it changed after sharding: re-run the batch")
    try:
        result = transform_chunk_bytes(data, steps, target_crs, chunk.row_offset)
    except TransformError as exc:
        raise TransformError(f"{where}: {exc}") from None
    except ReconciliationError as exc:
        raise ReconciliationError(f"{where}: {exc}") from None
    if result.rows_in != chunk.rows:
        raise ReconciliationError(f"{where}: the chunk index says {chunk.rows} rows but the "
                                  f"object has {result.rows_in}")
    rejects = None
    if result.rejects is not None:
        rejects = Chunk(
            key=rejects_key, layer=chunk.layer, ordinal=chunk.ordinal, row_offset=chunk.row_offset,
            rows=result.rows_rejected, bbox=result.rejects_bbox, crs=chunk.crs,
            bytes=len(result.rejects), source_rows=result.rows_in,
            sha256=store.put_bytes(bucket, rejects_key, result.rejects, PARQUET),
        )
    output = Chunk(
        key=out_key, layer=chunk.layer, ordinal=chunk.ordinal, row_offset=chunk.row_offset,
        rows=result.rows_out, bbox=result.bbox, crs=target_crs, bytes=len(result.data),
        source_rows=result.rows_in,
        sha256=store.put_bytes(bucket, out_key, result.data, PARQUET),
    )
    return TransformedChunk(rows_in=result.rows_in, chunk=output, rejects=rejects,
                            reject_reasons=result.reject_reasons,
                            geometry_types=list(result.geometry_types))
