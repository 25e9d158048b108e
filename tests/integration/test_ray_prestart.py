"""Workers started when a run connects have the transform's modules loaded before its first chunk."""

import os
import time

import psutil
import pytest

from etl_pipelines.ray.submit import TaskSpec, run_bounded
from etl_pipelines.ray.workers import prestart_workers, retire_workers
from etl_pipelines.resources.ray import PRESTART_MODULES

pytestmark = pytest.mark.integration


def test_prestarted_workers_run_the_chunks_with_their_imports_done(stack_env):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=os.environ["RAY_ADDRESS"], namespace="prestart-test", log_to_driver=False)
    try:
        warm = set(ray.get(prestart_workers(PRESTART_MODULES), timeout=120))
        assert len(warm) == int(ray.cluster_resources()["CPU"])

        def first_chunk(_: int) -> tuple[int, bool]:
            import os as os_
            import sys

            return os_.getpid(), all(m in sys.modules for m in PRESTART_MODULES)

        seen = []
        run_bounded(first_chunk, [TaskSpec(f"prestart-test:{i}", (i,)) for i in range(6)],
                    max_in_flight=len(warm), max_retries=0,
                    on_done=lambda spec, result, elapsed: seen.append(result))
        assert {pid for pid, _ in seen} <= warm
        assert all(loaded for _, loaded in seen)
        # once the chunks are done, every worker that ran them is ended, the driver stays
        assert retire_workers() == warm
        deadline = time.monotonic() + 20
        while (alive := {pid for pid in warm if psutil.pid_exists(pid)}) and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive, f"workers {sorted(alive)} still run after retire_workers()"
        assert ray.is_initialized()
    finally:
        ray.shutdown()
