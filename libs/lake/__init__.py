"""The lake stage: the key of every staged and published object (``keys``), publishing datasets
with their completion manifest written last (``publish``), and a batch's datasets and lineage
(``batch``), and what the janitor may remove of staging and stray lake parts (``housekeeping``)."""

from libs.lake.batch import batch_datasets, lineage_records, publish_batch_to_lake
from libs.lake.housekeeping import (
    RUNS_FOLDER,
    folders_of,
    staged_objects,
    unlisted_parts,
)
from libs.lake.keys import (
    CHUNK_STAGES,
    OP_OUTPUTS_FOLDER,
    chunk_key,
    completion_key,
    dataset_prefix,
    part_key,
    publication_prefix,
    rejects_dataset,
    result_prefix,
    run_prefix,
)
from libs.lake.publish import (
    publish_to_lake,
    put_completion_manifest,
    read_completion_manifest,
    read_completion_manifest_and_etag,
)

__all__ = [
    "OP_OUTPUTS_FOLDER",
    "RUNS_FOLDER",
    "folders_of",
    "staged_objects",
    "unlisted_parts",
    "CHUNK_STAGES",
    "chunk_key",
    "batch_datasets",
    "completion_key",
    "dataset_prefix",
    "lineage_records",
    "part_key",
    "publication_prefix",
    "publish_batch_to_lake",
    "publish_to_lake",
    "put_completion_manifest",
    "read_completion_manifest",
    "read_completion_manifest_and_etag",
    "rejects_dataset",
    "result_prefix",
    "run_prefix",
]
