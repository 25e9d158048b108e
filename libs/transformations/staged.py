"""Transform a chunk that lives in object storage: the body of one Ray task.

Paths travel, data does not: the task reads its input chunk and writes its output chunk
itself, so the Ray object store carries only these small arguments and results.
"""

from __future__ import annotations

import hashlib

from libs.chunk_index import Chunk
from libs.object_store import ObjectStore, ObjectStoreSettings
from libs.transformations.chunk import transform_chunk_bytes


def transform_staged_chunk(
    settings: ObjectStoreSettings, bucket: str, chunk: Chunk, out_key: str, target_crs: str
) -> Chunk:
    """Read ``chunk``, transform it, write it to ``out_key``; returns the output chunk."""
    store = ObjectStore(settings)
    result = transform_chunk_bytes(store.get_bytes(bucket, chunk.key), target_crs)
    store.put_bytes(bucket, out_key, result.data, "application/vnd.apache.parquet")
    return Chunk(
        key=out_key, layer=chunk.layer, ordinal=chunk.ordinal, row_offset=chunk.row_offset,
        rows=result.rows_out, bbox=result.bbox, crs=target_crs, bytes=len(result.data),
        sha256=hashlib.sha256(result.data).hexdigest(),
    )
