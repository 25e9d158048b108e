"""Manifest discovery: one sensor tick over a large landing zone against one over a small one.

Two buckets stand in for landing zones, filled once and kept (``bench-discovery-<N>``; a
marker object says the fill finished, so later runs reuse it): ``BENCH_DISCOVERY_LARGE``
(default 100,000) and ``BENCH_DISCOVERY_SMALL`` (default 1,000) tiny objects, in batch
folders of 99 data objects and one manifest (invalid, recorded in the ledger as such: what
a landing zone looks like once its batches were handled). Each round lands one new manifest
(sorting after everything, as a dated batch id would) before timing, then times one tick of
the real ``manifest_sensor`` from a steady-state cursor (``position.after`` past the last
filler key, the sweep halfway through the bucket). After timing: the new manifest is in the
cursor and recorded in the ledger, and the cursor is under its documented bound; the object
is then deleted again.

Cases: ``resume-<N>`` for both sizes, the ratio ``discovery_tick_large_vs_small`` (best
rounds; ~1 means a tick costs what is new, not what exists), and ``full-listing-<large>``:
the same tick without a position (what every tick cost before, and what the first tick of
a fresh cursor costs). Needs the local stack. ``BENCH_DISCOVERY_ROUNDS`` (default 25: a
round is ~0.2 s, and the best of 5 moved the ratio to 1.46 on a loaded machine).
"""

from __future__ import annotations

import io
import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from dagster import DagsterInstance, build_sensor_context

from benchmarks import summary
from devstack.envfile import read_env_file
from devstack.layout import ENV_FILE
from devstack.s3 import store_settings
from etl_pipelines.resources import InputLimitsResource, LedgerResource, ObjectStoreResource
from etl_pipelines.sensors import discovery, manifests
from libs.ledger import Ledger
from libs.manifest import MANIFEST_FILENAME
from libs.object_store import ObjectStore

LARGE = int(os.environ.get("BENCH_DISCOVERY_LARGE", "100000"))
SMALL = int(os.environ.get("BENCH_DISCOVERY_SMALL", "1000"))
ROUNDS = int(os.environ.get("BENCH_DISCOVERY_ROUNDS", "25"))
FOLDER = 100  # objects per batch folder, the last one its manifest
MARKER = "~filled"  # sorts after every filler key
_best: dict[str, float] = {}


def _key(i: int) -> str:
    folder, item = divmod(i, FOLDER)
    name = MANIFEST_FILENAME if item == FOLDER - 1 else f"part-{item:02d}.bin"
    return f"bench-discovery-{folder:06d}/{name}"


class Zone:
    """A filled bucket, the resources a tick needs, and a steady-state cursor over it."""

    def __init__(self, env: dict[str, str], ledger: Ledger, size: int):
        settings = store_settings(env, "admin")
        self.store = ObjectStore(settings)
        self.size = size
        self.bucket = f"bench-discovery-{size}"
        self.ledger = ledger
        self.resources = {
            "object_store": ObjectStoreResource(
                endpoint=settings.endpoint, access_key=settings.access_key,
                secret_key=settings.secret_key, landing_bucket=self.bucket),
            "ledger": LedgerResource(connection_string=env["MONGO_CONNECTION_STRING"]),
            "input_limits": InputLimitsResource(),
        }

    def fill(self) -> None:
        client = self.store.client
        if not client.bucket_exists(self.bucket):
            client.make_bucket(self.bucket)
        if self.store.exists(self.bucket, MARKER):
            return

        def put(i: int) -> None:
            key = _key(i)
            data = b"{}" if key.endswith(MANIFEST_FILENAME) else b"x"
            etag = client.put_object(self.bucket, key, io.BytesIO(data), len(data)).etag
            if key.endswith(MANIFEST_FILENAME):
                self.ledger.record_manifest(manifest_key=key, etag=etag.strip('"'),
                                            status="invalid", batch_id=None,
                                            errors=["benchmark filler"])

        with ThreadPoolExecutor(max_workers=10) as pool:
            list(pool.map(put, range(self.size)))
        self.store.write_bytes(self.bucket, MARKER, str(self.size).encode(), "text/plain")

    def steady_cursor(self) -> str:
        """Past every filler key (and the marker), the sweep where a full page follows
        (halfway through the large zone, at the start of the small one)."""
        half = "" if self.size < 2 * discovery.SWEEP_PAGE else _key(self.size // 2)
        return discovery.write_cursor({}, discovery.Position(after=MARKER, sweep=half))

    def tick(self, instance: DagsterInstance, cursor: str | None):
        with build_sensor_context(instance=instance, cursor=cursor,
                                  resources=self.resources) as context:
            return manifests.manifest_sensor(context)


@pytest.fixture(scope="module")
def zones():
    env = read_env_file(ENV_FILE)
    from pymongo import MongoClient

    client = MongoClient(env["MONGO_CONNECTION_STRING"], tz_aware=True)
    ledger = Ledger(client)
    made = {size: Zone(env, ledger, size) for size in (SMALL, LARGE)}
    for zone in made.values():
        zone.fill()
    yield made
    client.close()


@pytest.fixture(scope="module")
def instance():
    with DagsterInstance.ephemeral() as inst:
        yield inst


CASES = [f"resume-{SMALL}", f"resume-{LARGE}", f"full-listing-{LARGE}"]


@pytest.mark.benchmark(group="discovery")
@pytest.mark.parametrize("case", CASES)
def test_discovery_tick(benchmark, zones, instance, case):
    mode, size = case.rsplit("-", 1)
    zone = zones[int(size)]
    landed: list[str] = []

    def setup():
        # after the marker; without a position, first (the first listing stops at FIRST_PAGE)
        first = "!" if mode == "full-listing" else "~"
        key = f"{first}new-{uuid.uuid4().hex[:12]}/{MANIFEST_FILENAME}"
        zone.store.write_bytes(zone.bucket, key, b"{}", "application/json")
        landed.append(key)
        return (instance, None if mode == "full-listing" else zone.steady_cursor()), {}

    results = []
    try:
        benchmark.pedantic(lambda *a: results.append(zone.tick(*a)), setup=setup,
                           rounds=ROUNDS if mode == "resume" else 2, iterations=1,
                           # the first tick connects to the ledger
                           warmup_rounds=1 if mode == "resume" else 0)
        for key, result in zip(landed, results, strict=True):
            processed = discovery.read_cursor(result.cursor)
            assert key in processed, (case, key)
            assert zone.ledger.manifests_for_key(key)[0]["status"] == "invalid"
            assert len(result.cursor.encode()) < discovery.CURSOR_BOUND_BYTES
    finally:
        for key in landed:
            zone.store.delete(zone.bucket, key)
    best = benchmark.stats.stats.min
    _best[case] = best
    benchmark.extra_info.update(objects=zone.size + 1, best_s=round(best, 4),
                                median_s=round(benchmark.stats.stats.median, 4))
    small, large = _best.get(f"resume-{SMALL}"), _best.get(f"resume-{LARGE}")
    if case == f"resume-{LARGE}" and small:
        summary.record_ratio(
            "discovery_tick_large_vs_small", large / small, better="lower", target=1.5,
            note=f"one tick with 1 new manifest over {summary.size_label(LARGE)} vs "
                 f"{summary.size_label(SMALL)} landed objects, best rounds")
    if case == f"full-listing-{LARGE}" and large:
        benchmark.extra_info["full_vs_resume"] = round(best / large, 1)
        print(f"\ndiscovery, best of rounds: resume {SMALL} objects {small * 1e3:.1f} ms, "
              f"{LARGE} objects {large * 1e3:.1f} ms (x{large / small:.2f}); a full listing of "
              f"{LARGE} {best * 1e3:.0f} ms")
