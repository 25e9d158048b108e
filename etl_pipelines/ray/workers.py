"""The job's worker processes: started ahead of the first chunk (imports done) and ended once
the run's last Ray stage is done, so that idle workers do not hold memory PostgreSQL needs."""

import time
from collections.abc import Sequence
from typing import Any


def _import_modules(modules: Sequence[str]) -> int:
    import importlib
    import os

    for name in modules:
        importlib.import_module(name)
    return os.getpid()


def _one_task_per_cpu(remote: Any, name: str, scheduling_strategy: str, *args: Any) -> list[Any]:
    """Submit ``remote(*args)`` once per CPU of the cluster, all at once, one CPU each: with
    every worker of the job idle, each takes one (the prestart and the retirement rely on it)."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return [remote.options(name=name, num_cpus=1, max_retries=0,
                           scheduling_strategy=scheduling_strategy).remote(*args)
            for _ in range(max(cpus, 1))]


def prestart_workers(modules: Sequence[str], *, scheduling_strategy: str = "SPREAD") -> list[Any]:
    """Start one worker per CPU of the cluster and import ``modules`` in it, without waiting.

    Ray starts a job's worker processes on its first tasks, and a worker's first chunk would
    pay for the imports (GEOS, PROJ, pandas, pyarrow: about 1-3 s per worker). Called when a
    run connects, this overlaps that start-up with the stages before the transform; the
    workers stay in the job's pool and take its chunk tasks. Returns the task refs (tests
    wait on them; the run does not)."""
    import ray

    return _one_task_per_cpu(ray.remote(_import_modules), "prestart:import", scheduling_strategy,
                             list(modules))


def _retire(hold_s: float) -> int:
    import os

    time.sleep(hold_s)  # keep this CPU a moment, so that the other calls land on other workers
    return os.getpid()


def retire_workers(*, scheduling_strategy: str = "SPREAD", hold_s: float = 0.2,
                   timeout_s: float = 30.0) -> set[int]:
    """End this job's idle worker processes once its last Ray stage is done.

    A worker keeps its imports (~230 MiB: GEOS, PROJ, pandas, pyarrow) and the pages of its
    largest chunk (a chunk task leaves its freed memory to the worker's next chunk, which
    reuses those pages: faulting fresh ones in cost a 250k-point task ~10% more CPU). After
    a stage nothing of the job runs on Ray, its workers would stay idle in its pool (the
    transform op ends the whole job instead: ``RayResource.disconnect``; this is for a
    driver that stays connected). One task per cluster CPU, submitted together and each
    holding its CPU for ``hold_s`` so that every idle worker takes one, declared with
    ``max_calls=1``, which makes the worker that ran it exit (Ray's own way of recycling a
    worker). Best effort: waits at most ``timeout_s`` and returns the pids of the workers
    that took one; a worker missed stays until the job ends."""
    import ray

    refs = _one_task_per_cpu(ray.remote(max_calls=1)(_retire), "retire:worker",
                             scheduling_strategy, hold_s)
    done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in pending:
        ray.cancel(ref)
    pids = set()
    for ref in done:
        try:
            pids.add(ray.get(ref))
        except Exception:  # a worker that died meanwhile is gone already
            continue
    return pids
