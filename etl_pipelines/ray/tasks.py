"""The Ray task bodies and their specs: what runs on a worker, named for the dashboard.

A task takes small descriptors (the chunk, its keys, the recipe) and reads and writes its data
in object storage itself; it calls ``libs`` and records its own counters on the node that ran
it (``etl_pipelines.ray.metrics``).
"""

from __future__ import annotations

import resource
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from etl_pipelines.ray.metrics import record_stage
from etl_pipelines.ray.submit import TaskSpec
from libs.descriptors import Chunk, TransformedChunk
from libs.lake.keys import chunk_key
from libs.object_store import ObjectStoreSettings
from libs.transformations import transform_staged_chunk

if TYPE_CHECKING:  # a worker needs only the task body's imports
    from libs.manifest import Manifest


#: Memory a transform task asks for: a worker's own footprint (Ray, interpreter, imports)
#: plus a multiple of its chunk's (GeoParquet) bytes: decoded columns, GEOS objects, the
#: encoded output. Both measured on typical chunks, with a margin (``docs/limits.md``).
TASK_BASE_MEMORY = 384 * 2**20
TASK_MEMORY_PER_CHUNK_BYTE = 20


def task_memory(chunk: Chunk) -> int:
    """The memory request (bytes) of the task that transforms ``chunk``."""
    return TASK_BASE_MEMORY + TASK_MEMORY_PER_CHUNK_BYTE * chunk.bytes


def transform_spec(manifest: Manifest, staging_prefix: str, settings: ObjectStoreSettings,
                   bucket: str, chunk: Chunk) -> TaskSpec:
    """The task that transforms one sharded chunk, named ``transform:<batch>:<layer>:<chunk>``,
    asking for ``task_memory(chunk)``."""
    return TaskSpec(
        name=f"transform:{manifest.batch_id}:{chunk.layer}:{chunk.ordinal:05d}",
        args=(manifest.batch_id, settings, bucket, chunk,
              chunk_key(staging_prefix, "transformed", chunk.layer, chunk.ordinal),
              chunk_key(staging_prefix, "rejects", chunk.layer, chunk.ordinal),
              manifest.recipe_for(chunk.layer), manifest.target_crs),
        memory=task_memory(chunk))


def peak_rss() -> int:
    """This process's peak resident memory in bytes: what a task's memory request must cover.

    ``VmHWM`` where Linux has it (``ru_maxrss`` survives exec, so a worker would report the
    peak of the process that started it), else ``ru_maxrss`` (KiB on Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def transform_chunk(
    batch_id: str, settings: ObjectStoreSettings, bucket: str, chunk: Chunk, out_key: str,
    rejects_key: str, steps: Sequence[Any], target_crs: str,
) -> TransformedChunk:
    """The transform Ray task: ``transform_staged_chunk`` and then this chunk's counts."""
    result = transform_staged_chunk(settings, bucket, chunk, out_key, rejects_key, steps,
                                    target_crs)
    rejected = result.rejects.rows if result.rejects is not None else 0
    written = result.chunk.bytes + (result.rejects.bytes if result.rejects is not None else 0)
    record_stage("transform", batch_id, chunk.layer, features=result.rows_in, bytes_=written,
                 rejects=rejected, chunks=1)
    result = result.model_copy(update={"peak_rss": peak_rss()})
    # no release_memory() here: the worker's next chunk reuses these pages, and fresh ones
    # cost it ~10% more CPU (more on a VM that hands freed pages back to its host); the op
    # ends the run's Ray job, and with it the workers, once the stage's last chunk is done
    return result
