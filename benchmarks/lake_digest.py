"""The lake bytes of one real run, as sha256 per object: the check that a refactor kept behaviour.

Runs the ``ingest_batch`` job in this process against the local stack (as the ``ours``
pipeline of the benchmarks does) on a seeded input, reads the batch's completion manifest,
and prints, per dataset, its rows and every part's sha256 (keyed by dataset and part name,
so that two runs with different batch ids and publications compare), plus the manifest's
dataset entries without their keys. Run it before and after a change and compare::

    .venv/bin/python -m benchmarks.lake_digest sample 1000000 > before.json
    .venv/bin/python -m benchmarks.lake_digest bench 1000000 > before-bench.json
    ... change ...
    .venv/bin/python -m benchmarks.lake_digest sample 1000000 --compare before.json

``sample`` is the demo's batch (``libs.sample_batch``: N points + the countries); ``bench``
is the benchmark's four layers at N features each. The run's lake objects are removed after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path


def content_digest(data: bytes) -> str:
    """sha256 of a part's schema and values with floats at 12 significant digits: equal for
    two runs whose only difference is the order PostgreSQL summed a join's floats in (the
    layers load over parallel connections, so the rows a join aggregates come in any order)."""
    import io

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    digest = hashlib.sha256(str(table.schema).encode())
    for column in table.itercolumns():
        if pa.types.is_floating(column.type):
            column = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
            column = pa.array([f"{value:.12g}" for value in column])
        for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
            for buffer in chunk.buffers():
                if buffer is not None:
                    digest.update(buffer)
    return digest.hexdigest()


def lake_digest(store, batch_id: str, save: Path | None = None) -> dict:
    """Every object the batch's completion manifest lists, hashed from the lake itself
    (and written under ``save``, when given, to look into a difference)."""
    from libs.lake import read_completion_manifest

    completion = read_completion_manifest(store, "data-lake", batch_id)
    if completion is None:
        raise SystemExit(f"batch {batch_id!r} has no completion manifest")
    digest = {}
    for name, entry in sorted(completion["datasets"].items()):
        parts = {}
        for obj in entry["objects"]:
            data = store.get_bytes("data-lake", obj["key"])
            actual = hashlib.sha256(data).hexdigest()
            if actual != obj["sha256"]:
                raise SystemExit(f"{obj['key']}: sha256 {actual} but the manifest lists "
                                 f"{obj['sha256']}")
            parts[obj["key"].rsplit("/", 1)[1]] = {"rows": obj["rows"], "sha256": actual,
                                                   "content": content_digest(data)}
            if save is not None:
                (save / name).mkdir(parents=True, exist_ok=True)
                (save / name / obj["key"].rsplit("/", 1)[1]).write_bytes(data)
        described = json.loads(json.dumps(entry).replace(batch_id, "<batch_id>"))
        # keys (the objects' and the folder's) differ on every publication: the digest is of
        # what the manifest says and what the parts hold, so digests of two runs compare
        digest[name] = {"rows": entry["rows"], "parts": parts, "manifest_entry": {
            k: v for k, v in described.items() if k not in ("objects", "prefix")}}
    return digest


def run_sample(n: int, scratch: Path, save: Path | None) -> dict:
    import uuid

    from dagster import DagsterInstance

    from benchmarks.pipelines import stack_env
    from devstack.s3 import store_settings
    from libs.lake import completion_key, dataset_prefix
    from libs.object_store import ObjectStore
    from tests.integration.pipeline import land_sample, request_for, run_ingest, sensor_tick

    env = stack_env()
    store = ObjectStore(store_settings(env, "pipeline"))
    batch_id = f"digest-sample-{n}-{uuid.uuid4().hex[:8]}"
    land_sample(ObjectStore(store_settings(env, "landing")), scratch, batch_id, n_points=n)
    with DagsterInstance.ephemeral() as instance:
        request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
        assert request is not None, f"the sensor requested no run for {batch_id}"
        assert run_ingest(instance, request).success
    try:
        return lake_digest(store, batch_id, save)
    finally:
        for name in ("points", "countries", "points_per_country", "points_rejects",
                     "countries_rejects"):
            store.delete_prefix("data-lake", dataset_prefix(name, batch_id))
        store.delete("data-lake", completion_key(batch_id))
        # only the admin identity deletes in landing-zone (the pipeline never does)
        ObjectStore(store_settings(env, "admin")).delete_prefix("landing-zone", f"{batch_id}/")


def run_bench(n: int, scratch: Path, save: Path | None) -> dict:
    from benchmarks.conftest import lines_flatgeobuf, points_flatgeobuf, polygons_flatgeobuf
    from benchmarks.pipelines import Ours, stack_env

    stack_env()
    spec = {"size": n, "out": str(scratch), "layers": {
        "points": str(points_flatgeobuf(n)), "lines": str(lines_flatgeobuf(n)),
        "polygons": str(polygons_flatgeobuf(n))}}
    ours = Ours(spec)
    try:
        ours.run()
        return lake_digest(ours.store, ours.batch_id, save)
    finally:
        ours.cleanup()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lake_digest",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("case", choices=["sample", "bench"])
    parser.add_argument("n", type=int, help="features per generated layer")
    parser.add_argument("--compare", type=Path, help="a digest printed earlier: exit 1 if "
                        "this run's lake bytes differ")
    parser.add_argument("--save", type=Path, help="also write every lake object under this folder")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lake-digest-") as scratch:
        run = run_sample if args.case == "sample" else run_bench
        digest = run(args.n, Path(scratch), args.save)
    print(json.dumps(digest, indent=1, sort_keys=True))
    if args.compare is None:
        return 0
    before = json.loads(args.compare.read_text())
    def without(entry: dict | None, field: str) -> dict | None:
        return None if entry is None else {**entry, "parts": {
            name: {k: v for k, v in part.items() if k != field}
            for name, part in entry["parts"].items()}}

    names = sorted(before.keys() | digest.keys())
    differ = [n for n in names if without(before.get(n), "sha256") != without(digest.get(n), "sha256")]
    reordered = [n for n in names if n not in differ and before[n] != digest[n]]
    identical = [n for n in names if n not in differ and n not in reordered]
    print(f"lake digest against {args.compare}: byte-identical {identical}; same values up to "
          f"float summation order {reordered}; DIFFERENT {differ}", file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
