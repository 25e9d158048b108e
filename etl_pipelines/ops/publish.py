"""Publish op: copy the transformed layers, their rejects and each join's result into the lake,
record their lineage, then switch the completion manifest to them as the last act
(``libs.lake.publish_batch_to_lake``); then close the run in the ledger and remove this run's
staged objects.

Lineage goes before the switch so that a ledger outage fails the run with the lake unchanged
(re-execution publishes again), never a published batch without lineage. A publication that
did not go live may keep lineage (when the ledger cannot be reached to forget it): readers ask
for the lineage of the publication the completion manifest names (docs/run-lifecycle.md).
"""

import time

from dagster import MetadataValue, OpExecutionContext, Out, op

from etl_pipelines.ray.metrics import StageProgress
from etl_pipelines.resources import LedgerResource, ObjectStoreResource
from etl_pipelines.types import BatchPlan, JoinResults
from libs.descriptors import ChunkIndex
from libs.lake import completion_key, lineage_records, publish_batch_to_lake, run_prefix


@op(out=Out(dict), tags={"stage": "publish"})
def publish_batch(
    context: OpExecutionContext, plan: BatchPlan, transformed: ChunkIndex, joined: JoinResults,
    object_store: ObjectStoreResource, ledger: LedgerResource,
) -> dict:
    manifest, book, started = plan.manifest, ledger.ledger, time.monotonic()
    tried: list[str] = []

    def record_lineage(completion: dict) -> None:
        tried.append(completion["publication"])
        book.record_lineages(lineage_records(completion, transformed, manifest,
                                             plan.manifest_key, context.run_id,
                                             object_store.lake_uri))

    try:
        completion = publish_batch_to_lake(object_store.store, object_store.lake_bucket,
                                           transformed,
                                           {join.name: join.parts for join in joined.joins},
                                           manifest,
                                           context.run_id, before_switch=record_lineage)
    except Exception:
        _forget_lineage(context, book, tried)
        raise
    _log_progress(context, manifest.batch_id, completion["datasets"], started)
    rows = {d: e["rows"] for d, e in completion["datasets"].items()}
    completion_uri = object_store.lake_uri(completion_key(manifest.batch_id))
    book.record_run(context.run_id, status="SUCCESS", rows=rows, completion_manifest=completion_uri)
    # this run's staging only: a re-execution read its inputs from the staging of the run it
    # re-executes, which a concurrent re-execution of that run may still be reading
    removed = object_store.store.delete_prefix(transformed.staging_bucket,
                                               run_prefix(context.run_id))
    context.log.info(f"published batch {manifest.batch_id}: {rows}; removed {removed} staged objects")
    context.add_output_metadata({
        "rows": MetadataValue.json(rows),
        "objects": sum(len(e["objects"]) for e in completion["datasets"].values()),
        "completion_manifest": MetadataValue.url(completion_uri),
        "lake_uris": MetadataValue.json({d: object_store.lake_uri(e["prefix"])
                                         for d, e in completion["datasets"].items()}),
        "crs": manifest.target_crs,
    })
    return completion


def _forget_lineage(context: OpExecutionContext, book, publications: list[str]) -> None:
    """Best effort: the lineage of a publication that did not go live. If the ledger is what
    failed this stays, harmless (readers select the live publication's lineage)."""
    for publication in publications:
        try:
            book.forget_lineage(publication)
        except Exception as exc:  # noqa: BLE001 - the publish error is the one to raise
            context.log.warning(f"lineage of publication {publication} not removed ({exc}); "
                                "no completion manifest names it")


def _log_progress(context: OpExecutionContext, batch_id: str, datasets: dict,
                  started: float) -> None:
    """One line per dataset once the completion manifest is written (nothing is reported
    before: rejects count as rejects, not as features, in the metrics)."""
    progress = StageProgress(context.log.info, "publish", batch_id,
                             sum(len(entry["objects"]) for entry in datasets.values()),
                             started=started)
    for dataset, entry in datasets.items():
        is_rejects = entry["kind"] == "rejects"
        progress.chunk_done(dataset, rows=entry["rows"], chunks=len(entry["objects"]),
                            bytes_=sum(o["bytes"] for o in entry["objects"]),
                            features=0 if is_rejects else entry["rows"],
                            rejects=entry["rows"] if is_rejects else 0, detail=dataset)
