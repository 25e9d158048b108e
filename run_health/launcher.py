"""A run launcher that fails a run whose worker stopped heartbeating.

``DefaultRunLauncher`` (Dagster 1.13) cannot tell a dead run worker from a live one, so run
monitoring used to fail a run lost with its process only at its ``dagster/max_runtime``. The
run worker of a job that opts in (tag ``HEARTBEAT_EVERY_TAG``, see ``run_health.executor``)
stamps its run with ``HEARTBEAT_TAG`` every few seconds, in run storage, which the daemon reads
in both stacks (in compose the daemon and the user code are separate containers: no PID to
check). A run whose last beat, or start when it has not beaten yet, is older than the timeout
is reported FAILED; the MonitoringDaemon then marks it failed ("Detected run worker status
FAILED: ..."), which ``libs.ledger.run_failure_cause`` reads as a lost process.

A beat older than the run's start is not this run's: a re-execution may inherit its parent's
tags. Runs of jobs that do not opt in are reported RUNNING (their max runtime still applies).
The beat is the run worker's clock and the check the daemon's: keep hosts NTP-synced.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from dagster import DagsterRun, DefaultRunLauncher, Field, IntSource

# not re-exported at dagster's top level in 1.13; dagster.yaml's launchers live in this module
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus

#: Epoch seconds (run worker's clock) of the run worker's last heartbeat.
HEARTBEAT_TAG = "spatial_etl/heartbeat"
#: Opt-in, on the job: its run workers beat every this many seconds.
HEARTBEAT_EVERY_TAG = "spatial_etl/heartbeat_every"
#: A lost run is failed this long after its last beat (plus up to one monitoring poll).
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 60
#: However short the timeout configured, a run may miss this many beats (a storage blip).
MIN_MISSED_BEATS = 3


def worker_health(tags: Mapping[str, str], started_at: float | None, now: float,
                  timeout_seconds: float) -> CheckRunHealthResult:
    """The health of a STARTED run's worker, from its tags and start time (epoch seconds)."""
    every_text = tags.get(HEARTBEAT_EVERY_TAG)
    if not every_text:
        return CheckRunHealthResult(WorkerStatus.RUNNING, "the job does not heartbeat; its "
                                    "max runtime bounds it")
    try:
        every = float(every_text)
        beat = float(tags[HEARTBEAT_TAG]) if tags.get(HEARTBEAT_TAG) else None
    except ValueError:
        return CheckRunHealthResult(WorkerStatus.UNKNOWN, f"unreadable heartbeat tags "
                                    f"{HEARTBEAT_EVERY_TAG}={every_text!r}, "
                                    f"{HEARTBEAT_TAG}={tags.get(HEARTBEAT_TAG)!r}")
    if started_at is not None and beat is not None and beat < started_at:
        beat = None  # the parent run's, copied to this re-execution
    last = beat if beat is not None else started_at
    if last is None:
        return CheckRunHealthResult(WorkerStatus.RUNNING, "not started yet")
    limit = max(timeout_seconds, MIN_MISSED_BEATS * every)
    age = now - last
    if age <= limit:
        return CheckRunHealthResult(WorkerStatus.RUNNING, f"last heartbeat {age:.0f} s ago")
    since = "heartbeat" if beat is not None else "start, and no heartbeat since"
    return CheckRunHealthResult(
        WorkerStatus.FAILED,
        f"no heartbeat from the run worker for {age:.0f} s (last: its {since}; it beats every "
        f"{every:g} s, the launcher's heartbeat_timeout_seconds is {limit:g} s): its process "
        "is gone (container or host lost, killed) or stalled")


class HeartbeatRunLauncher(DefaultRunLauncher):
    """``DefaultRunLauncher`` (runs start in the code server's container) that checks a run
    worker's health from its heartbeat tag (``worker_health``)."""

    def __init__(self, inst_data: Any = None,
                 heartbeat_timeout_seconds: int = DEFAULT_HEARTBEAT_TIMEOUT_SECONDS) -> None:
        self.heartbeat_timeout_seconds = heartbeat_timeout_seconds
        super().__init__(inst_data=inst_data)

    @classmethod
    def config_type(cls) -> dict:
        return {"heartbeat_timeout_seconds": Field(
            IntSource, is_required=False, default_value=DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
            description="fail a run whose worker has not heartbeaten for this long")}

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Mapping[str, Any]
                          ) -> HeartbeatRunLauncher:
        return cls(inst_data=inst_data, **config_value)

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        record = self._instance.get_run_record_by_id(run.run_id)
        started_at = record.start_time if record is not None else None
        # the run as the monitor read it this poll: tags are as fresh as the poll
        return worker_health(run.tags, started_at, time.time(), self.heartbeat_timeout_seconds)
