"""Publishing one batch: its layers, their rejects and each join's result as lake datasets,
and the lineage each lake object records (which landed files, run, recipe and join made it).

Empty parts (every row of a chunk rejected) are counted but not published, except the one
part of a layer with no rows at all (an empty delivery, or every row rejected): the dataset
keeps its columns and CRS.
"""

from __future__ import annotations

from collections.abc import Callable

from libs.descriptors import Chunk, ChunkIndex, StagedPart
from libs.errors import PublishError
from libs.lake.keys import rejects_dataset
from libs.lake.publish import publish_to_lake
from libs.manifest import Manifest
from libs.object_store import ObjectStore


def batch_datasets(transformed: ChunkIndex, join_parts: dict[str, list[StagedPart]],
                   manifest: Manifest) -> tuple[dict[str, list[StagedPart]], dict[str, dict]]:
    """The batch's datasets (name -> staged parts) and what the completion manifest says of
    each (kind, layer, CRS, bbox, geometry types, or the join). ``join_parts``: each join's
    result parts by join name (none for a batch without a join)."""
    datasets: dict[str, list[StagedPart]] = {
        layer.layer: [StagedPart(c.key, c.rows, c.bytes, c.sha256)
                      for c in _published_chunks(layer.chunks)]
        for layer in transformed.layers
    }
    info = {layer.layer: {"kind": "layer", "layer": layer.layer, "crs": layer.crs,
                          "bbox": layer.bbox, "geometry_types":
                              transformed.geometry_types.get(layer.layer, [])}
            for layer in transformed.layers}
    for rejects in transformed.rejects:
        name = rejects_dataset(rejects.layer)
        _refuse_clash(name, datasets, f"the rejected rows of layer {rejects.layer!r}")
        datasets[name] = [StagedPart(c.key, c.rows, c.bytes, c.sha256) for c in rejects.chunks]
        info[name] = {"kind": "rejects", "layer": rejects.layer, "crs": rejects.crs}
    joins = {join.name: join for join in manifest.spatial_joins}
    for join_name, parts in join_parts.items():
        _refuse_clash(join_name, datasets, f"the result of join {join_name!r}")
        datasets[join_name] = parts
        info[join_name] = {"kind": "join", "crs": manifest.target_crs,
                           "join": joins[join_name].model_dump()}
    return datasets, info


def _published_chunks(chunks: list[Chunk]) -> list[Chunk]:
    """The chunks holding rows; for a layer of no rows (an empty delivery) its first chunk,
    so that the dataset still has one object carrying its columns and CRS."""
    return [c for c in chunks if c.rows] or chunks[:1]


def _refuse_clash(name: str, datasets: dict, what: str) -> None:
    """The manifest's validation refuses the names it can see clash; layers named from a
    multi-layer file's own layer names (``all_layers``) are only known once it is read."""
    if name in datasets:
        raise PublishError(
            f"lake dataset {name!r} would hold both {what} and another dataset of the batch "
            f"named {name!r}; rename the layer or the join in the manifest")


def publish_batch_to_lake(store: ObjectStore, lake_bucket: str, transformed: ChunkIndex,
                          join_parts: dict[str, list[StagedPart]], manifest: Manifest,
                          run_id: str, before_switch: Callable[[dict], None] | None = None
                          ) -> dict:
    """Publish every dataset of the batch, completion manifest last (``before_switch``: see
    ``publish_to_lake``); returns the manifest."""
    datasets, info = batch_datasets(transformed, join_parts, manifest)
    return publish_to_lake(
        store, staging_bucket=transformed.staging_bucket, lake_bucket=lake_bucket,
        batch_id=manifest.batch_id, run_id=run_id, datasets=datasets, dataset_info=info,
        before_switch=before_switch)


def lineage_records(completion: dict, transformed: ChunkIndex, manifest: Manifest,
                    manifest_key: str, run_id: str,
                    lake_uri: Callable[[str], str]) -> list[tuple[str, dict]]:
    """(lake URI, lineage document) for every object the completion manifest lists: its
    batch, run, publication, dataset, checksum and rows, the landed files it came from (with their
    sha256), the manifest, the layer's recipe, and the join that made a join result (None for
    a layer or its rejects)."""
    inputs = [s.model_dump() for s in transformed.sources]
    records = []
    for dataset, entry in completion["datasets"].items():
        joined = (entry["join"]["left"], entry["join"]["right"]) if entry["kind"] == "join" \
            else (entry.get("layer"),)
        layer_inputs = [i for i in inputs if i["layer"] in joined]
        for obj in entry["objects"]:
            records.append((lake_uri(obj["key"]), {
                "batch_id": manifest.batch_id, "run_id": run_id,
                "publication": completion.get("publication"), "dataset": dataset,
                "kind": entry["kind"], "key": obj["key"], "sha256": obj["sha256"],
                "rows": obj["rows"], "inputs": layer_inputs, "manifest_key": manifest_key,
                "recipe": [step.model_dump() for step in manifest.recipe_for(entry["layer"])]
                if "layer" in entry else None,
                "join": entry["join"] if entry["kind"] == "join" else None,
            }))
    return records
