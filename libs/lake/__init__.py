"""The lake stage: the key of every staged and published object (``keys``), and publishing a
batch's datasets with their completion manifest written last (``publish``)."""

from libs.lake.keys import (
    CHUNK_STAGES,
    chunk_key,
    completion_key,
    dataset_prefix,
    part_key,
    rejects_dataset,
    result_prefix,
    run_prefix,
)
from libs.lake.publish import publish_to_lake, read_completion_manifest

__all__ = [
    "CHUNK_STAGES",
    "chunk_key",
    "completion_key",
    "dataset_prefix",
    "part_key",
    "publish_to_lake",
    "read_completion_manifest",
    "rejects_dataset",
    "result_prefix",
    "run_prefix",
]
