"""Test-only kill points for the daemon tests (tests/integration/kill_point_defs.py): the
arming file, and a run coordinator for the test instance's dagster.yaml that kills its own
daemon once a run request is stored. Imported by the daemon: dagster and stdlib only."""

import json
import os
import signal
from pathlib import Path

from dagster import QueuedRunCoordinator


def kill_if_armed(point: str, batches: set[str], pid: int | None = None) -> None:
    """SIGKILL the armed daemon (``pid``, else the arming file's) if ``point`` is the armed
    one and the armed batch is among ``batches`` (those the point sees); the arming file
    (KILL_POINT_FILE) is removed first, so it fires once."""
    path = Path(os.environ.get("KILL_POINT_FILE", "/nonexistent"))
    try:
        armed = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if armed.get("point") != point or armed.get("batch") not in batches:
        return
    path.unlink()
    os.kill(pid or int(armed["pid"]), signal.SIGKILL)
    if pid is None:  # in the code server: the daemon is gone, the tick goes no further
        raise RuntimeError(f"killed the daemon at {point} (test kill point)")


def arm(path: Path, point: str, batch: str, pid: int) -> None:
    path.write_text(json.dumps({"point": point, "batch": batch, "pid": pid}))


class KillingRunCoordinator(QueuedRunCoordinator):
    """The queued run coordinator; armed ``after_run_stored``, it kills its own daemon once
    the run is in the run storage (queued), before the sensor's tick is finished."""

    def submit_run(self, context):
        run = super().submit_run(context)
        kill_if_armed("after_run_stored", {run.tags.get("batch_id", "")}, pid=os.getpid())
        return run
