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

Limits: a task asks for ``TaskSpec.memory`` bytes (Ray then places no more tasks on a node
than its memory holds) and has ``time_limit`` seconds from its submission: Ray has no
per-task timeout, so the loop waits with a deadline and force-cancels a task past it. A task
the memory monitor kills is retried ``RAY_task_oom_retries`` times (``docs/limits.md``).
"""

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TaskSpec:
    """One task: its dashboard name, its arguments and the memory it asks for (bytes)."""

    name: str
    args: tuple[Any, ...]
    memory: int = 0


class TaskLimitError(RuntimeError):
    """A task ran past its time limit, or was killed for memory more often than allowed."""


class RayClusterLost(ConnectionError):
    """The run lost its connection to the Ray cluster (head stopped or unreachable)."""


def cluster_lost(exc: BaseException) -> bool:
    """True when ``exc`` says the driver lost the cluster (Ray Client's gRPC channel, a
    connection error of Ray's own), not that a task failed: a task's error arrives as a
    ``RayTaskError``, which also subclasses its cause (a ``ConnectionError`` of the store)."""
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError):
        return False
    module = type(exc).__module__ or ""
    return (module.startswith("grpc") or isinstance(exc, (ConnectionError,
                                                          ray.exceptions.RaySystemError)))


#: What Ray retries a task for (besides worker death). A task retries transient errors itself
#: with the run's policy (``libs.retry``); one that outlasts it escapes as
#: ``ServiceUnavailable``, a ``ConnectionError``, and the task gets another go from Ray. Not
#: ``OSError`` in general: a missing file or a full disk would fail the same way again.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)

#: Seconds to fetch the result of a task ``ray.wait`` reported ready.
RESULT_FETCH_TIMEOUT_S = 60.0

#: Tasks started ahead (``EarlyTasks.started``): task name -> (spec, Ray object ref).
StartedTasks = dict[str, tuple[TaskSpec, Any]]


def _submit(remote: Any, spec: TaskSpec, *, max_retries: int,
            retry_exceptions: Sequence[type[BaseException]], scheduling_strategy: str) -> Any:
    memory = {"memory": spec.memory} if spec.memory else {}
    return remote.options(name=spec.name, num_cpus=1, max_retries=max_retries,
                          retry_exceptions=list(retry_exceptions),
                          scheduling_strategy=scheduling_strategy, **memory).remote(*spec.args)


def _result(ray: Any, ref: Any, spec: TaskSpec) -> Any:
    """The task's result; a task Ray gave up on after memory kills fails naming its chunk.
    ``ray.wait`` said it is ready, so fetching the small descriptor is quick; the deadline
    only catches a node that died holding it."""
    try:
        return ray.get(ref, timeout=RESULT_FETCH_TIMEOUT_S)
    except ray.exceptions.OutOfMemoryError as exc:
        raise TaskLimitError(
            f"task {spec.name} was killed for lack of memory and retried until its OOM retries "
            f"(RAY_task_oom_retries) ran out; it asked for {spec.memory / 2**20:,.0f} MiB: "
            f"make its chunks smaller (shard op chunk_megabytes) or give the workers more "
            f"memory ({str(exc).splitlines()[0]})") from None


def _describe(exc: BaseException) -> str:
    """``Type: first line`` of ``exc`` (gRPC errors span several lines)."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}"[:300]


def _overdue(pending: dict[Any, TaskSpec], submitted: dict[Any, float], now: float,
             time_limit: float | None) -> list[Any]:
    if time_limit is None:
        return []
    return [ref for ref in pending if now - submitted[ref] > time_limit]


def run_bounded(
    fn: Callable[..., Any],
    tasks: Sequence[TaskSpec],
    *,
    max_in_flight: int,
    max_retries: int,
    on_done: Callable[[TaskSpec, Any, float], None],
    retry_exceptions: Sequence[type[BaseException]] = TRANSIENT_ERRORS,
    scheduling_strategy: str = "SPREAD",
    started: StartedTasks | None = None,
    time_limit: float | None = None,
) -> None:
    """Run ``fn(*task.args)`` as one Ray task per spec, at most ``max_in_flight`` at once.

    Ray retries a task whose worker died (``max_retries``) and one that raised one of the
    declared transient ``retry_exceptions``; any other error fails the whole call, after
    the tasks still in flight are cancelled. ``scheduling_strategy`` is Ray's ("SPREAD" or
    "DEFAULT"). ``started`` (``EarlyTasks.close``): tasks an earlier op already submitted
    with the same options; a spec equal to one of them waits for that task instead of
    running again. ``time_limit``: seconds a task may take from its submission (from this
    call for ``started`` ones); one past it is force-cancelled and the call fails naming it.
    """
    import ray

    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    remote = ray.remote(fn)
    early = dict(started or {})
    todo = list(tasks)
    todo.reverse()
    pending: dict[Any, TaskSpec] = {}
    submitted: dict[Any, float] = {}
    clock = time.monotonic()
    try:
        while todo or pending:
            while todo and len(pending) < max_in_flight:
                spec = todo.pop()
                earlier = early.pop(spec.name, None)
                if earlier is not None and earlier[0] == spec:
                    ref = earlier[1]
                else:
                    ref = _submit(remote, spec, max_retries=max_retries,
                                  retry_exceptions=retry_exceptions,
                                  scheduling_strategy=scheduling_strategy)
                pending[ref], submitted[ref] = spec, time.monotonic()
            wait = None if time_limit is None else max(
                0.0, min(submitted[r] for r in pending) + time_limit - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait)
            for ref in ready:
                spec = pending.pop(ref)
                on_done(spec, _result(ray, ref, spec), time.monotonic() - clock)
            late = _overdue(pending, submitted, time.monotonic(), time_limit)
            if late:
                ray.cancel(late[0], force=True)
                raise TaskLimitError(
                    f"task {pending.pop(late[0]).name} ran longer than its time limit of "
                    f"{time_limit:g} s and was cancelled: raise the transform's time limit "
                    "(RayResource.task_time_limit_seconds) or make its chunks smaller")
    except Exception as exc:
        if not cluster_lost(exc):
            raise
        pending.clear()  # nothing left to cancel on a cluster that is gone
        early.clear()
        raise RayClusterLost(
            f"lost the Ray cluster with {len(todo)} task(s) not started ({_describe(exc)}): "
            "its head was stopped or became unreachable. Nothing was published; re-execute "
            "the run from failure once the cluster (RAY_ADDRESS) is back") from exc
    finally:
        for ref in [*pending, *(ref for _, ref in early.values())]:
            ray.cancel(ref)


class EarlyTasks:
    """Start a later op's tasks while this op still produces their inputs (the transform of
    the chunks already written while the shard op cuts the next ones).

    ``offer`` submits a task when fewer than ``max_in_flight`` of those already started are
    unfinished, and otherwise declines it: the later op runs every task not started here.
    Thread-safe (offers come from the object-store writer threads). ``close`` ends the
    offers and returns the started tasks, for ``run_bounded(started=...)`` in the later op
    (``RayResource.early_tasks`` hands them over); ``cancel`` cancels them when this op
    fails. Same task options as ``run_bounded``."""

    def __init__(self, fn: Callable[..., Any], *, max_in_flight: int, max_retries: int,
                 retry_exceptions: Sequence[type[BaseException]] = TRANSIENT_ERRORS,
                 scheduling_strategy: str = "SPREAD") -> None:
        import ray

        self._remote = ray.remote(fn)
        self._options = {"max_retries": max_retries, "retry_exceptions": retry_exceptions,
                         "scheduling_strategy": scheduling_strategy}
        self._max_in_flight = max_in_flight
        self._started: StartedTasks = {}
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

    def close(self) -> StartedTasks:
        """End the offers and return the started tasks (name -> (spec, ref))."""
        with self._lock:
            self._closed = True
            return dict(self._started)

    def cancel(self) -> None:
        """Cancel every started task; no offer is taken after."""
        import ray

        with self._lock:
            self._closed = True
            for _, ref in self._started.values():
                ray.cancel(ref)
