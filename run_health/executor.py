"""The in-process executor, with a heartbeat: the run worker stamps its run every few seconds.

The job runs in one process (``in_process_executor``), so the executor lives exactly as long
as the run's work: a daemon thread writes ``HEARTBEAT_TAG`` (epoch seconds) to run storage
every ``HEARTBEAT_SECONDS`` from the start of execution to its end, whichever steps run (a
re-execution from failure too). ``run_health.launcher`` fails a run whose beats stopped. A
beat that cannot be written (storage blip) is logged and retried at the next beat; the
launcher tolerates missed beats (``MIN_MISSED_BEATS``).

A living run that hangs keeps beating: its max runtime (``dagster/max_runtime``) stops it.
A run found FAILURE or CANCELED in storage while its work goes on, without a termination
request (given up by run monitoring after a stall longer than the launcher's timeout, or
storage unreachable that long), is interrupted at that beat as a termination request would,
so that it does not go on to publish a batch its run and ledger call failed.
"""

from __future__ import annotations

import _thread
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from dagster import (
    DagsterEvent,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    Executor,
    InitExecutorContext,
    executor,
    in_process_executor,
)

from run_health.launcher import HEARTBEAT_EVERY_TAG, HEARTBEAT_TAG

if TYPE_CHECKING:  # dagster's own types, not re-exported at its top level
    from dagster._core.execution.context.system import PlanOrchestrationContext
    from dagster._core.execution.plan.plan import ExecutionPlan
    from dagster._core.execution.retries import RetryMode
    from dagster._core.execution.step_dependency_config import StepDependencyConfig

#: Seconds between beats: one run-storage update each; small beside the launcher's timeout.
HEARTBEAT_SECONDS = 5
#: The tags a job carries to opt in to heartbeat health checks (with this executor).
HEARTBEAT_JOB_TAGS = {HEARTBEAT_EVERY_TAG: str(HEARTBEAT_SECONDS)}

#: A run in one of these has been given up (by run monitoring, or a user) in storage.
GIVEN_UP = (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)

log = logging.getLogger(__name__)


class RunHeartbeat:
    """A daemon thread stamping ``run_id`` with ``HEARTBEAT_TAG`` every ``every`` seconds,
    first at entry; stopped at exit. ``on_given_up`` (default: a SIGINT to the main thread,
    Dagster's termination path) is called once if the run is found given up (``GIVEN_UP``)."""

    def __init__(self, instance: DagsterInstance, run_id: str, every: float,
                 on_given_up: Callable[[], None] = _thread.interrupt_main) -> None:
        self.instance, self.run_id, self.every = instance, run_id, every
        self.on_given_up, self.gave_up = on_given_up, False
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.loop, name=f"heartbeat-{run_id[:8]}",
                                       daemon=True)

    def beat(self) -> bool:
        try:
            self.instance.add_run_tags(self.run_id, {HEARTBEAT_TAG: f"{time.time():.3f}"})
            run = self.instance.get_run_by_id(self.run_id)
        except Exception:  # the next beat retries; the launcher tolerates gaps
            log.warning("run %s: heartbeat not written, retrying in %s s", self.run_id,
                        self.every, exc_info=True)
            return False
        if run is not None and run.status in GIVEN_UP and not self.gave_up:
            self.gave_up = True
            if self.termination_requested():
                return True  # the termination in progress stops the run: no second interrupt
            log.error("run %s is %s in run storage while its worker still runs (given up by "
                      "run monitoring after a silence longer than its heartbeat timeout?): "
                      "interrupting it", self.run_id, run.status.value)
            self.on_given_up()
        return True

    def termination_requested(self) -> bool:
        return bool(self.instance.all_logs(self.run_id, of_type=DagsterEventType.RUN_CANCELING))

    def loop(self) -> None:
        while not self.stopped.wait(self.every):
            self.beat()

    def __enter__(self) -> RunHeartbeat:
        self.beat()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=self.every + 30)


class HeartbeatingExecutor(Executor):
    """Runs the plan with ``inner`` while a ``RunHeartbeat`` stamps the run."""

    def __init__(self, inner: Executor, every: float) -> None:
        self.inner, self.every = inner, every

    @property
    def retries(self) -> RetryMode:
        return self.inner.retries

    @property
    def step_dependency_config(self) -> StepDependencyConfig:
        return self.inner.step_dependency_config

    def execute(self, plan_context: PlanOrchestrationContext,
                execution_plan: ExecutionPlan) -> Iterator[DagsterEvent]:
        with RunHeartbeat(plan_context.instance, plan_context.run_id, self.every):
            yield from self.inner.execute(plan_context, execution_plan)


# Same name and config as in_process_executor: run config written for it keeps working.
@executor(name="in_process", config_schema=in_process_executor.config_schema)
def heartbeat_in_process_executor(init_context: InitExecutorContext) -> Executor:
    """``in_process_executor`` whose run worker heartbeats (``RunHeartbeat``)."""
    return HeartbeatingExecutor(in_process_executor.executor_creation_fn(init_context),
                                HEARTBEAT_SECONDS)
