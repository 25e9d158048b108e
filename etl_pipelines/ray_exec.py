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

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TaskSpec:
    """One task: its dashboard name and its arguments."""

    name: str
    args: tuple[Any, ...]


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, ConnectionError, TimeoutError)

# Tasks an op started for a later op of the same run (EarlyTasks.hand_over): run id ->
# task name -> (spec, ref). The job runs in one process (in_process_executor), so the later
# op finds them here; a re-execution is a new run and a new process, and starts its own.
_HANDED_OVER: dict[str, dict[str, tuple[TaskSpec, Any]]] = {}
_HANDED_OVER_LOCK = threading.Lock()


def _submit(remote: Any, spec: TaskSpec, *, max_retries: int,
            retry_exceptions: Sequence[type[BaseException]], scheduling_strategy: str) -> Any:
    return remote.options(name=spec.name, num_cpus=1, max_retries=max_retries,
                          retry_exceptions=list(retry_exceptions),
                          scheduling_strategy=scheduling_strategy).remote(*spec.args)


def run_bounded(
    fn: Callable[..., Any],
    tasks: Sequence[TaskSpec],
    *,
    max_in_flight: int,
    max_retries: int,
    on_done: Callable[[TaskSpec, Any, float], None],
    retry_exceptions: Sequence[type[BaseException]] = TRANSIENT_ERRORS,
    scheduling_strategy: str = "SPREAD",
    started: dict[str, tuple[TaskSpec, Any]] | None = None,
) -> None:
    """Run ``fn(*task.args)`` as one Ray task per spec, at most ``max_in_flight`` at once.

    Ray retries a task whose worker died (``max_retries``) and one that raised one of the
    declared transient ``retry_exceptions``; any other error fails the whole call, after
    the tasks still in flight are cancelled. ``scheduling_strategy`` is Ray's ("SPREAD" or
    "DEFAULT"). ``started`` (``take_started``): tasks an earlier op already submitted with
    the same options; a spec equal to one of them waits for that task instead of running
    again.
    """
    import ray

    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    remote = ray.remote(fn)
    early = dict(started or {})
    todo = list(tasks)
    todo.reverse()
    pending: dict[Any, TaskSpec] = {}
    clock = time.monotonic()
    try:
        while todo or pending:
            while todo and len(pending) < max_in_flight:
                spec = todo.pop()
                earlier = early.pop(spec.name, None)
                if earlier is not None and earlier[0] == spec:
                    pending[earlier[1]] = spec
                    continue
                pending[_submit(remote, spec, max_retries=max_retries,
                                retry_exceptions=retry_exceptions,
                                scheduling_strategy=scheduling_strategy)] = spec
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                spec = pending.pop(ref)
                on_done(spec, ray.get(ref), time.monotonic() - clock)
    finally:
        for ref in [*pending, *(ref for _, ref in early.values())]:
            ray.cancel(ref)


class EarlyTasks:
    """Start a later op's tasks while this op still produces their inputs (the transform of
    the chunks already written while the shard op cuts the next ones).

    ``offer`` submits a task when fewer than ``max_in_flight`` of those already started are
    unfinished, and otherwise declines it: the later op runs every task not started here.
    Thread-safe (offers come from the object-store writer threads). ``hand_over`` parks the
    started tasks for ``take_started`` in the later op; ``cancel`` cancels them when this op
    fails. Same task options as ``run_bounded``."""

    def __init__(self, fn: Callable[..., Any], *, max_in_flight: int, max_retries: int,
                 retry_exceptions: Sequence[type[BaseException]] = TRANSIENT_ERRORS,
                 scheduling_strategy: str = "SPREAD") -> None:
        import ray

        self._remote = ray.remote(fn)
        self._options = {"max_retries": max_retries, "retry_exceptions": retry_exceptions,
                         "scheduling_strategy": scheduling_strategy}
        self._max_in_flight = max_in_flight
        self._started: dict[str, tuple[TaskSpec, Any]] = {}
        self._unfinished: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def count(self) -> int:
        return len(self._started)

    def offer(self, spec: TaskSpec) -> bool:
        """Submit ``spec`` now if a slot is free; True when it was submitted."""
        import ray

        with self._lock:
            if self._closed:
                return False
            if self._unfinished:
                _, self._unfinished = ray.wait(self._unfinished,
                                               num_returns=len(self._unfinished), timeout=0)
            if len(self._unfinished) >= self._max_in_flight:
                return False
            ref = _submit(self._remote, spec, **self._options)
            self._started[spec.name] = (spec, ref)
            self._unfinished.append(ref)
            return True

    def hand_over(self, run_id: str) -> int:
        """Park the started tasks for ``take_started(run_id)``; no offer is taken after."""
        with self._lock:
            self._closed = True
            with _HANDED_OVER_LOCK:
                _HANDED_OVER[run_id] = dict(self._started)
            return len(self._started)

    def cancel(self) -> None:
        """Cancel every started task; no offer is taken after."""
        import ray

        with self._lock:
            self._closed = True
            for _, ref in self._started.values():
                ray.cancel(ref)


def take_started(run_id: str) -> dict[str, tuple[TaskSpec, Any]]:
    """The tasks an earlier op of run ``run_id`` handed over (empty when none; once only)."""
    with _HANDED_OVER_LOCK:
        return _HANDED_OVER.pop(run_id, {})


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
    the transform stage nothing of the run runs on Ray, but the job's workers would stay
    idle in its pool through the load, the join and the publish, the stages where PostgreSQL
    needs the memory; the driver stays connected (those stages still record their Ray
    metrics). So the op calls this: one task per cluster CPU, submitted together and each
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
