"""Submitting many Ray tasks with a bounded number in flight; ``import ray`` stays in here.

Tasks get names that say which batch and chunk they are, so the Ray dashboard tells a
person what is running. Results are handed to ``on_done`` as they finish (any order).

Placement: tasks are submitted with ``scheduling_strategy="SPREAD"`` by default. Chunk tasks
are independent, about equal in size, and take only small descriptors as arguments (the data
moves through object storage), so there is no object locality for Ray's default policy to
exploit; that policy packs tasks onto the node of the driver until it is about half busy,
which on a small cluster leaves worker nodes idle and puts every chunk of a batch on the
node a failure would take down. SPREAD hands them out round-robin over the nodes that have
a free CPU. ``"DEFAULT"`` is still available (RayResource.scheduling_strategy).
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TaskSpec:
    """One task: its dashboard name and its arguments."""

    name: str
    args: tuple[Any, ...]


def run_bounded(
    fn: Callable[..., Any],
    tasks: Sequence[TaskSpec],
    *,
    max_in_flight: int,
    max_retries: int,
    on_done: Callable[[TaskSpec, Any, float], None],
    retry_exceptions: Sequence[type[BaseException]] = (OSError, ConnectionError, TimeoutError),
    scheduling_strategy: str = "SPREAD",
) -> None:
    """Run ``fn(*task.args)`` as one Ray task per spec, at most ``max_in_flight`` at once.

    Ray retries a task whose worker died (``max_retries``) and one that raised one of the
    declared transient ``retry_exceptions``; any other error fails the whole call, after
    the tasks still in flight are cancelled. ``scheduling_strategy`` is Ray's ("SPREAD" or
    "DEFAULT").
    """
    import ray

    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    remote = ray.remote(fn)
    todo = list(tasks)
    todo.reverse()
    pending: dict[Any, TaskSpec] = {}
    started = time.monotonic()
    try:
        while todo or pending:
            while todo and len(pending) < max_in_flight:
                spec = todo.pop()
                ref = remote.options(name=spec.name, num_cpus=1, max_retries=max_retries,
                                     retry_exceptions=list(retry_exceptions),
                                     scheduling_strategy=scheduling_strategy).remote(*spec.args)
                pending[ref] = spec
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                spec = pending.pop(ref)
                on_done(spec, ray.get(ref), time.monotonic() - started)
    finally:
        for ref in pending:
            ray.cancel(ref)


def _import_modules(modules: Sequence[str]) -> int:
    import importlib
    import os

    for name in modules:
        importlib.import_module(name)
    return os.getpid()


def prestart_workers(modules: Sequence[str], *, scheduling_strategy: str = "SPREAD") -> list[Any]:
    """Start one worker per CPU of the cluster and import ``modules`` in it, without waiting.

    Ray starts a job's worker processes on its first tasks, and a worker's first chunk would
    pay for the imports (GEOS, PROJ, pandas, pyarrow: about 1-3 s per worker). Called when a
    run connects, this overlaps that start-up with the stages before the transform; the
    workers stay in the job's pool and take its chunk tasks. Returns the task refs (tests
    wait on them; the run does not)."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    remote = ray.remote(_import_modules)
    return [remote.options(name="prestart:import", num_cpus=1, max_retries=0,
                           scheduling_strategy=scheduling_strategy).remote(list(modules))
            for _ in range(max(cpus, 1))]
