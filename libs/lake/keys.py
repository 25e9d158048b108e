"""Every object key the pipeline writes, in one place: the run's staging area and the lake.

Staging (bucket ``etl-staging``), one prefix per run, removed once the batch is published
(what a failed run leaves: by the staging janitor after a retention, ``housekeeping``)::

    runs/<run_id>/chunks/<layer>/chunk-<NNNNN>.parquet       sharded chunks
    runs/<run_id>/transformed/<layer>/chunk-<NNNNN>.parquet  transformed chunks
    runs/<run_id>/rejects/<layer>/chunk-<NNNNN>.parquet      rejected rows of a chunk
    runs/<run_id>/results/<join>/part-<NNNNN>.parquet        a join's result
    dagster-io/<run_id>/<step>/<output>.json                 an op's output (the IO manager)

Lake (bucket ``data-lake``), stable and documented in the README; readers follow the
completion manifest, which names every object of the batch::

    <dataset>/<batch_id>/<publication>/part-<NNNNN>.parquet  one dataset per layer/join
    _batches/<batch_id>.json                                 completion manifest, written last

``<publication>`` is the publishing run's id and a suffix unique to the attempt, so that a
republication never writes over an object the live completion manifest lists.
"""

from __future__ import annotations

import uuid

from libs.manifest import REJECTS_SUFFIX

#: The stages whose chunks are staged per layer.
CHUNK_STAGES = ("chunks", "transformed", "rejects")
COMPLETION_PREFIX = "_batches/"
#: The IO manager's default prefix for op outputs in the staging bucket.
OP_OUTPUTS_FOLDER = "dagster-io"


def run_prefix(run_id: str) -> str:
    """The staging prefix of one run: everything the run stages lives under it."""
    return f"runs/{run_id}/"


def chunk_key(prefix: str, stage: str, layer: str, ordinal: int) -> str:
    """A staged chunk of ``layer`` written by ``stage`` (one of ``CHUNK_STAGES``)."""
    if stage not in CHUNK_STAGES:
        raise ValueError(f"stage must be one of {CHUNK_STAGES}, got {stage!r}")
    return f"{prefix}{stage}/{layer}/chunk-{ordinal:05d}.parquet"


def op_output_key(prefix: str, identifier: list[str]) -> str:
    """Where the IO manager keeps an op's output (``identifier``: run id, step, output name)."""
    return "/".join([prefix, *identifier]) + ".json"


def result_prefix(prefix: str, join_name: str) -> str:
    """Where a join's result parts are staged."""
    return f"{prefix}results/{join_name}/"


def part_key(prefix: str, number: int) -> str:
    """Part ``number`` of a dataset (in the lake) or of a staged result."""
    return f"{prefix}part-{number:05d}.parquet"


def dataset_prefix(dataset: str, batch_id: str) -> str:
    """A batch's folder of one lake dataset."""
    return f"{dataset}/{batch_id}/"


def publication_id(run_id: str) -> str:
    """A new id for one attempt of ``run_id`` to publish a batch (an op retried in the same run
    publishes again, and must not write over what its first attempt published)."""
    return f"{run_id}.{uuid.uuid4().hex[:8]}"


def publication_prefix(dataset: str, batch_id: str, publication: str) -> str:
    """One publication's folder of a lake dataset: its parts, and nothing else's."""
    return f"{dataset_prefix(dataset, batch_id)}{publication}/"


def completion_key(batch_id: str) -> str:
    """The batch's completion manifest: the batch is published exactly when it exists."""
    return f"{COMPLETION_PREFIX}{batch_id}.json"


def rejects_dataset(layer: str) -> str:
    """The lake dataset of a layer's rejected rows."""
    return layer + REJECTS_SUFFIX
