"""Publish op: copy the transformed layers, their rejects and the join result into the lake,
completion manifest last (``libs.lake.publish_batch_to_lake``), then record lineage, close the
run in the ledger and remove this run's staged objects."""

import time

from dagster import MetadataValue, OpExecutionContext, Out, op

from etl_pipelines.ray.metrics import StageProgress
from etl_pipelines.resources import LedgerResource, ObjectStoreResource
from etl_pipelines.types import BatchPlan, JoinResult
from libs.descriptors import ChunkIndex
from libs.lake import completion_key, lineage_records, publish_batch_to_lake, run_prefix


@op(out=Out(dict), tags={"stage": "publish"})
def publish_batch(
    context: OpExecutionContext, plan: BatchPlan, transformed: ChunkIndex, joined: JoinResult,
    object_store: ObjectStoreResource, ledger: LedgerResource,
) -> dict:
    manifest = plan.manifest
    started = time.monotonic()
    completion = publish_batch_to_lake(object_store.store, object_store.lake_bucket, transformed,
                                       joined.name, joined.parts, manifest, context.run_id)
    datasets = completion["datasets"]
    # nothing is reported until the completion manifest is written: one line per dataset once
    # it is (rejects count as rejects, not as features, in the metrics)
    progress = StageProgress(context.log.info, "publish", manifest.batch_id,
                             sum(len(entry["objects"]) for entry in datasets.values()),
                             started=started)
    for dataset, entry in datasets.items():
        is_rejects = entry["kind"] == "rejects"
        progress.chunk_done(dataset, rows=entry["rows"], chunks=len(entry["objects"]),
                            bytes_=sum(o["bytes"] for o in entry["objects"]),
                            features=0 if is_rejects else entry["rows"],
                            rejects=entry["rows"] if is_rejects else 0, detail=dataset)
    book = ledger.ledger
    for uri, record in lineage_records(completion, transformed, manifest, plan.manifest_key,
                                       context.run_id, object_store.lake_uri):
        book.record_lineage(uri, record)
    rows = {d: e["rows"] for d, e in datasets.items()}
    completion_uri = object_store.lake_uri(completion_key(manifest.batch_id))
    book.record_run(context.run_id, status="SUCCESS", rows=rows, completion_manifest=completion_uri)
    # this run's staging only: a re-execution read its inputs from the staging of the run it
    # re-executes, which a concurrent re-execution of that run may still be reading
    removed = object_store.store.delete_prefix(transformed.staging_bucket,
                                               run_prefix(context.run_id))
    context.log.info(f"published batch {manifest.batch_id}: {rows}; removed {removed} staged objects")
    context.add_output_metadata({
        "rows": MetadataValue.json(rows),
        "objects": sum(len(e["objects"]) for e in datasets.values()),
        "completion_manifest": MetadataValue.url(completion_uri),
        "lake_uris": MetadataValue.json(
            {d: object_store.lake_uri(e["prefix"]) for d, e in datasets.items()}),
        "crs": manifest.target_crs,
    })
    return completion
