"""Ray resource: connects the run to a Ray cluster; ``import ray`` stays inside.

Cleanup policy: the run's driver connection is closed as soon as the run no longer needs
Ray (``disconnect``, after the transform's last task), or when the run ends; a re-execution
whose steps need no Ray never connects. A driver stays tied to the head (Ray ends it 60 s
after losing the GCS), so load, join and publish run without one. The cluster and its other
jobs are never touched.

Why not dagster-ray's resources: we looked at them (0.4.x). Its ``LocalRay`` starts a
private cluster inside the run process, and its KubeRay resources create a cluster per run
and talk to it in Ray Client mode. Our runs attach to a long-lived, shared cluster named by
``RAY_ADDRESS`` (a head's GCS address when the run worker is a Ray node, ``ray://`` from
outside), which is a plain ``ray.init``; a dependency for that would add a second set of
semantics to document. We keep the same shape (a typed resource, a local twin for tests via
``address="local"``, explicit cleanup) so that moving to dagster-ray's KubeRay resources for
per-run clusters on Kubernetes stays a small change.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr

from etl_pipelines.ray.submit import EarlyTasks, StartedTasks

#: What a chunk task imports: loaded by the prestarted workers.
PRESTART_MODULES = ("libs.transformations", "libs.object_store", "etl_pipelines.ray.tasks")


class RayResource(ConfigurableResource):
    """A Ray cluster (address from RAY_ADDRESS) that runs one task per chunk."""

    address: str = Field(
        description="RAY_ADDRESS: 'host:port' of a head's GCS, 'ray://host:10001' for Ray "
        "Client, or 'local' for a private in-process cluster (tests, notebooks)"
    )
    dashboard_url: str | None = Field(
        default=None, description="Ray dashboard URL linked from run metadata"
    )
    namespace: str = Field(default="spatial-etl", description="Ray namespace of our jobs")
    max_tasks_in_flight: int = Field(
        default=4, description="chunks submitted at once (2x the CPUs of a 2-core machine)"
    )
    task_max_retries: int = Field(
        default=3, description="retries of a chunk task when its worker dies or it fails "
        "with a transient error"
    )
    task_time_limit_seconds: float = Field(
        default=600.0, gt=0, description="wall time a chunk task may take from its submission "
        "before it is force-cancelled and the run fails naming the chunk (a 20 MiB chunk takes "
        "seconds; the limit leaves room for queueing behind max_tasks_in_flight and slow nodes)")
    task_oom_retries: int = Field(
        default=2, ge=0, le=15, description="retries of a chunk task the Ray memory monitor "
        "killed, on a private 'local' cluster (Ray's own default is unbounded); a shared "
        "cluster's nodes and drivers get RAY_task_oom_retries=2 from the stack that starts "
        "them (local stack, compose, KubeRay, cluster launcher)")
    local_num_cpus: int = Field(default=2, description="CPUs of a private 'local' cluster")
    connect_timeout_seconds: float = Field(
        default=60.0, gt=0, description="how long the run waits for the head's address to "
        "accept a connection, and for a Ray Client session to start (refused for a while "
        "after a head restarts), before it fails naming it (ray.init itself retries an "
        "unreachable GCS for minutes)")
    scheduling_strategy: Literal["SPREAD", "DEFAULT"] = Field(
        default="SPREAD", description="placement of chunk tasks: SPREAD over every node with a "
        "free CPU (independent chunks, data in object storage: nothing gains from locality), "
        "or Ray's DEFAULT (packs onto the driver's node first)")
    prestart_workers: bool = Field(
        default=True, description="when the run connects, start one worker per cluster CPU and "
        "import the transform's modules in it, so the workers are ready when the first chunk "
        "is (the import takes 1-3 s per worker)")

    # tasks a step started for a later step of this run (``early_tasks``): the job runs in
    # one process (in_process_executor), so the later step finds them on this resource; a
    # re-execution is a new run with resources of its own, and starts its own
    _handed_over: StartedTasks = PrivateAttr(default_factory=dict)

    @contextmanager
    def early_tasks(self, fn: Callable[..., Any], *, enabled: bool = True
                    ) -> Iterator[EarlyTasks | None]:
        """Start a later step's tasks of ``fn`` during this block (None when not ``enabled``):
        on success they are handed over to ``take_early_tasks``, on failure cancelled. Same
        task options as the later step's ``run_bounded``."""
        if not enabled:
            yield None
            return
        early = EarlyTasks(fn, max_in_flight=self.max_tasks_in_flight,
                           max_retries=self.task_max_retries,
                           scheduling_strategy=self.scheduling_strategy)
        try:
            yield early
        except BaseException:
            early.cancel()
            raise
        self._handed_over = early.close()

    def take_early_tasks(self) -> StartedTasks:
        """The tasks an earlier step of this run handed over (empty when none; once only)."""
        started, self._handed_over = self._handed_over, {}
        return started

    def job_id(self) -> str | None:
        """This run's Ray job id (hex), or None when not connected (or the cluster does not
        answer: the next Ray call fails naming that)."""
        import ray

        try:
            return ray.get_runtime_context().get_job_id() if ray.is_initialized() else None
        except Exception:  # noqa: BLE001 - for metadata only
            return None

    def setup_for_execution(self, context: InitResourceContext) -> None:
        import ray

        if ray.is_initialized():
            return
        try:
            self._connect(ray)
        except BaseException:
            # a failed connect (a Ray Client session refused, say) leaves half-set global
            # state behind that makes this process's next ray.init fail an internal assert
            ray.shutdown()
            raise

    def _connect(self, ray) -> None:
        if self.address == "local":
            # Ray retries a task its memory monitor killed without end unless told otherwise;
            # a shared cluster gets RAY_task_oom_retries from its stack (docs/limits.md)
            ray.init(address="local", num_cpus=self.local_num_cpus, namespace=self.namespace,
                     include_dashboard=False, log_to_driver=False,
                     _system_config={"task_oom_retries": self.task_oom_retries})
        else:
            deadline = time.monotonic() + self.connect_timeout_seconds
            wait_for_head(self.address, self.connect_timeout_seconds)
            while True:
                try:
                    ray.init(address=self.address, namespace=self.namespace, log_to_driver=False)
                    break
                except ConnectionError:
                    # a Ray Client session can be refused for a while after the head (re)starts
                    # ("Starting Ray client server failed"): tried again until the deadline
                    ray.shutdown()
                    if not self.address.startswith("ray://") or time.monotonic() >= deadline:
                        raise
                    time.sleep(2.0)
        if self.prestart_workers:
            from etl_pipelines.ray.workers import prestart_workers

            prestart_workers(PRESTART_MODULES, scheduling_strategy=self.scheduling_strategy)

    def disconnect(self) -> None:
        """End this run's Ray job (its workers exit with it): called once nothing later in
        the run submits a task. Idempotent.

        Unconditional: a Ray Client session whose cluster was lost reports itself not
        initialized but keeps its context, and the next ``ray.init`` of this process (the
        re-execution, in tests) would be refused; ``ray.shutdown`` clears it."""
        import ray

        ray.shutdown()

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        self.disconnect()


def wait_for_head(address: str, timeout_s: float) -> None:
    """Return once ``address`` ('host:port' or 'ray://host:port') accepts a TCP connection;
    ConnectionError naming it after ``timeout_s``. Other forms ('auto') are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s)).close()
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"the Ray head at {address} (RAY_ADDRESS) did not accept a connection "
                    f"within {timeout_s:g} s ({exc}); start or fix the cluster, then "
                    "re-execute the run") from exc
            time.sleep(1.0)
