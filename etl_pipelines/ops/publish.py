"""Publish op: copy the transformed layers and the join result into the lake, completion
manifest last, then record lineage and close the run in the ledger."""

from dagster import MetadataValue, OpExecutionContext, Out, op

from etl_pipelines.ops.load_join import JoinResult
from etl_pipelines.ops.validate import BatchPlan
from etl_pipelines.ray_metrics import StageProgress
from etl_pipelines.resources import LedgerResource, ObjectStoreResource
from libs.descriptors import ChunkIndex, StagedPart
from libs.lake import completion_key, publish_to_lake

REJECTS_SUFFIX = "_rejects"


@op(out=Out(dict), tags={"stage": "publish"})
def publish_batch(
    context: OpExecutionContext, plan: BatchPlan, transformed: ChunkIndex, joined: JoinResult,
    object_store: ObjectStoreResource, ledger: LedgerResource,
) -> dict:
    manifest = plan.manifest
    # Empty parts (every row of a chunk rejected) are counted but not published.
    datasets: dict[str, list[StagedPart]] = {
        layer.layer: [StagedPart(c.key, c.rows, c.bytes, c.sha256) for c in layer.chunks if c.rows]
        for layer in transformed.layers
    }
    info = {layer.layer: {"kind": "layer", "layer": layer.layer, "crs": layer.crs,
                          "bbox": layer.bbox, "geometry_types":
                              transformed.geometry_types.get(layer.layer, [])}
            for layer in transformed.layers}
    for rejects in transformed.rejects:
        name = rejects.layer + REJECTS_SUFFIX
        datasets[name] = [StagedPart(c.key, c.rows, c.bytes, c.sha256) for c in rejects.chunks]
        info[name] = {"kind": "rejects", "layer": rejects.layer, "crs": rejects.crs}
    datasets[joined.name] = joined.parts
    info[joined.name] = {"kind": "join", "crs": joined.crs, "join": manifest.join.model_dump()}
    progress = StageProgress(context.log.info, "publish", manifest.batch_id,
                             sum(len(parts) for parts in datasets.values()))
    completion = publish_to_lake(
        object_store.store, staging_bucket=transformed.staging_bucket,
        lake_bucket=object_store.lake_bucket, batch_id=manifest.batch_id, run_id=context.run_id,
        datasets=datasets, dataset_info=info)

    # publish_to_lake reports nothing until the completion manifest is written: one line per
    # dataset once it is (rejects count as rejects, not as features, in the metrics)
    for dataset, entry in completion["datasets"].items():
        objects = entry["objects"]
        is_rejects = entry["kind"] == "rejects"
        progress.chunk_done(dataset, rows=entry["rows"], chunks=len(objects),
                            bytes_=sum(o["bytes"] for o in objects),
                            features=0 if is_rejects else entry["rows"],
                            rejects=entry["rows"] if is_rejects else 0, detail=dataset)

    inputs = [s.model_dump() for s in transformed.sources]
    book = ledger.ledger
    for dataset, entry in completion["datasets"].items():
        layer_inputs = [i for i in inputs
                        if entry["kind"] == "join" or i["layer"] == entry.get("layer")]
        for obj in entry["objects"]:
            book.record_lineage(object_store.lake_uri(obj["key"]), {
                "batch_id": manifest.batch_id, "run_id": context.run_id, "dataset": dataset,
                "kind": entry["kind"], "key": obj["key"], "sha256": obj["sha256"],
                "rows": obj["rows"], "inputs": layer_inputs, "manifest_key": plan.manifest_key,
                "recipe": [step.model_dump() for step in manifest.recipe_for(entry["layer"])]
                if "layer" in entry else None,
                "join": manifest.join.model_dump(),
            })
    rows = {d: e["rows"] for d, e in completion["datasets"].items()}
    book.record_run(context.run_id, status="SUCCESS", rows=rows,
                    completion_manifest=object_store.lake_uri(completion_key(manifest.batch_id)))
    removed = object_store.store.delete_prefix(transformed.staging_bucket,
                                               f"{transformed.prefix}")
    context.log.info(f"published batch {manifest.batch_id}: {rows}; removed {removed} staged objects")
    context.add_output_metadata({
        "rows": MetadataValue.json(rows),
        "objects": sum(len(e["objects"]) for e in completion["datasets"].values()),
        "completion_manifest": MetadataValue.url(
            object_store.lake_uri(completion_key(manifest.batch_id))),
        "lake_uris": MetadataValue.json(
            {d: object_store.lake_uri(e["prefix"]) for d, e in completion["datasets"].items()}),
        "crs": manifest.target_crs,
    })
    return completion
