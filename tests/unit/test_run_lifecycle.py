"""Run lifecycle, offline: both instances monitor runs, the sensor bounds each run's runtime,
the run worker heartbeats and the launcher fails a silent one, and the ledger names the cause
of a run that run monitoring failed."""

import ast
import sys
import threading
import time

import yaml
from dagster import DagsterInstance, execute_job, job, op, reconstructable
from dagster._core.launcher import WorkerStatus

from devstack.dagster_local import DAGSTER_YAML
from devstack.layout import REPO
from etl_pipelines.jobs.ingest import ingest_batch
from etl_pipelines.resources import InputLimitsResource
from etl_pipelines.resources.limits import DEFAULT_MAX_RUN_SECONDS, MAX_RUNTIME_TAG
from libs.ledger import PROCESS_LOST_CAUSE, run_failure_cause
from run_health.executor import (
    HEARTBEAT_JOB_TAGS,
    HEARTBEAT_SECONDS,
    RunHeartbeat,
    heartbeat_in_process_executor,
)
from run_health.launcher import (
    HEARTBEAT_EVERY_TAG,
    HEARTBEAT_TAG,
    MIN_MISSED_BEATS,
    HeartbeatRunLauncher,
    worker_health,
)


def _monitoring(text: str) -> dict:
    return yaml.safe_load(text)["run_monitoring"]


def test_both_instances_monitor_runs_without_resuming_them():
    for name, text in (("dagster.yaml", (REPO / "dagster.yaml").read_text()),
                       ("devstack", DAGSTER_YAML.format(home="/h"))):
        monitoring = _monitoring(text)
        assert monitoring["enabled"] is True, name
        # DefaultRunLauncher cannot resume a run: any resume attempt would be refused
        assert monitoring["max_resume_run_attempts"] == 0, name
        assert monitoring["poll_interval_seconds"] > 0, name


def test_both_instances_queue_four_runs_and_retry_a_launch_while_user_code_is_down():
    for name, text in (("dagster.yaml", (REPO / "dagster.yaml").read_text()),
                       ("devstack", DAGSTER_YAML.format(home="/h"))):
        coordinator = yaml.safe_load(text)["run_coordinator"]
        assert coordinator["class"] == "QueuedRunCoordinator", name
        assert coordinator["config"]["max_concurrent_runs"] == 4, name
        assert coordinator["config"]["max_user_code_failure_retries"] > 0, name


def test_runs_get_a_max_runtime_tag_unless_disabled():
    assert InputLimitsResource().max_runtime_tags == {MAX_RUNTIME_TAG: str(DEFAULT_MAX_RUN_SECONDS)}
    assert InputLimitsResource(max_run_seconds=90).max_runtime_tags == {MAX_RUNTIME_TAG: "90"}
    assert InputLimitsResource(max_run_seconds=0).max_runtime_tags == {}


def test_monitor_failures_get_a_user_facing_cause():
    # the messages of Dagster 1.13's run monitoring (dagster/_daemon/monitoring/run_monitoring.py)
    forced = ("This job is being forcibly marked as failed. The computational resources created "
              "by the run may not have been fully cleaned up.")
    assert run_failure_cause(forced) == PROCESS_LOST_CAUSE
    assert run_failure_cause("Detected run worker status FAILED. Marking run x as failed.") == \
        PROCESS_LOST_CAUSE
    assert "maximum runtime" in run_failure_cause("Exceeded maximum runtime of 120 seconds.")
    assert "never started" in run_failure_cause(
        "Run timed out due to taking longer than 180 seconds to start.")
    assert run_failure_cause('Execution of run for "ingest_batch" failed. Steps failed: x') is None
    assert run_failure_cause(None) is None


# ------------------------------------------------------------------- run worker heartbeat


def test_a_run_is_healthy_while_it_beats_and_failed_once_silent_past_the_timeout():
    tags = {**HEARTBEAT_JOB_TAGS, HEARTBEAT_TAG: "1000.0"}
    assert worker_health(tags, 990.0, 1020.0, 30).status == WorkerStatus.RUNNING
    assert worker_health(tags, 990.0, 1030.0, 30).status == WorkerStatus.RUNNING
    lost = worker_health(tags, 990.0, 1031.0, 30)
    assert lost.status == WorkerStatus.FAILED
    assert "no heartbeat from the run worker for 31 s" in lost.msg, lost.msg
    # the failure message the monitoring daemon writes maps to the lost-process cause
    message = f"Detected run worker status {lost}. Marking run abc as failed."
    assert run_failure_cause(message) == PROCESS_LOST_CAUSE


def test_before_its_first_beat_a_run_is_judged_from_its_start():
    assert worker_health(HEARTBEAT_JOB_TAGS, 1000.0, 1029.0, 30).status == WorkerStatus.RUNNING
    lost = worker_health(HEARTBEAT_JOB_TAGS, 1000.0, 1031.0, 30)
    assert lost.status == WorkerStatus.FAILED and "no heartbeat since" in lost.msg, lost.msg
    assert worker_health(HEARTBEAT_JOB_TAGS, None, 1e9, 30).status == WorkerStatus.RUNNING


def test_a_beat_inherited_from_the_parent_run_does_not_count():
    tags = {**HEARTBEAT_JOB_TAGS, HEARTBEAT_TAG: "500.0"}  # a re-execution copied its parent's
    assert worker_health(tags, 1000.0, 1010.0, 30).status == WorkerStatus.RUNNING
    assert worker_health(tags, 1000.0, 1031.0, 30).status == WorkerStatus.FAILED


def test_runs_that_do_not_heartbeat_are_left_to_their_max_runtime():
    assert worker_health({}, 0.0, 1e9, 30).status == WorkerStatus.RUNNING
    odd = worker_health({HEARTBEAT_EVERY_TAG: "5", HEARTBEAT_TAG: "soon"}, 0.0, 1e9, 30)
    assert odd.status == WorkerStatus.UNKNOWN and "soon" in odd.msg


def test_a_short_timeout_still_tolerates_missed_beats():
    tags = {HEARTBEAT_EVERY_TAG: "20", HEARTBEAT_TAG: "1000.0"}
    assert worker_health(tags, 990.0, 1000.0 + 20 * MIN_MISSED_BEATS, 5).status == \
        WorkerStatus.RUNNING


def test_both_instances_check_run_worker_health_with_the_heartbeat_launcher(tmp_path):
    for name, text, timeout in (("dagster.yaml", (REPO / "dagster.yaml").read_text(), 60),
                                ("devstack", DAGSTER_YAML.format(home=tmp_path), 30)):
        launcher = yaml.safe_load(text)["run_launcher"]
        assert (launcher["module"], launcher["class"]) == (
            "run_health.launcher", "HeartbeatRunLauncher"), name
        assert launcher["config"]["heartbeat_timeout_seconds"] == timeout, name
    (tmp_path / "dagster.yaml").write_text(DAGSTER_YAML.format(home=tmp_path))
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        assert isinstance(instance.run_launcher, HeartbeatRunLauncher)
        assert instance.run_launcher.supports_check_run_worker_health
        assert instance.run_launcher.heartbeat_timeout_seconds == 30


def test_the_launcher_package_imports_only_dagster_and_the_standard_library():
    # the webserver/daemon image holds run_health and dagster, nothing else of ours
    for path in sorted((REPO / "run_health").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top in ("dagster", "run_health"), \
                    f"{path.name} imports {name}"


@op
def _nap() -> None:
    time.sleep(0.2)


@job(executor_def=heartbeat_in_process_executor, tags=HEARTBEAT_JOB_TAGS)
def heartbeating_job():
    _nap()


def test_the_ingest_job_heartbeats():
    assert ingest_batch.executor_def is heartbeat_in_process_executor
    assert ingest_batch.tags[HEARTBEAT_EVERY_TAG] == str(HEARTBEAT_SECONDS)


def test_a_run_worker_stamps_its_run_after_its_start(tmp_path):
    (tmp_path / "dagster.yaml").write_text(DAGSTER_YAML.format(home=tmp_path))
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        result = execute_job(reconstructable(heartbeating_job), instance)
        assert result.success
        record = instance.get_run_record_by_id(result.run_id)
        beat = float(record.dagster_run.tags[HEARTBEAT_TAG])
        assert record.start_time <= beat <= record.end_time
        health = instance.run_launcher.check_run_worker_health(record.dagster_run)
        assert health.status == WorkerStatus.RUNNING  # (the monitor checks STARTED runs only)


def test_a_run_given_up_while_its_worker_runs_is_interrupted_at_the_next_beat(tmp_path):
    (tmp_path / "dagster.yaml").write_text(DAGSTER_YAML.format(home=tmp_path))
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        run = instance.create_run_for_job(job_def=heartbeating_job)
        interrupted = threading.Event()
        with RunHeartbeat(instance, run.run_id, 0.05, on_given_up=interrupted.set) as beat:
            assert not interrupted.wait(0.3), "a living run is left alone"
            instance.report_run_failed(run, "Detected run worker status FAILED: 'x'.")
            assert interrupted.wait(10), "the monitor failed the run: its worker stops"
        assert beat.gave_up


def test_a_run_being_terminated_is_not_interrupted_twice(tmp_path):
    (tmp_path / "dagster.yaml").write_text(DAGSTER_YAML.format(home=tmp_path))
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        run = instance.create_run_for_job(job_def=heartbeating_job)
        interrupted = threading.Event()
        with RunHeartbeat(instance, run.run_id, 0.05, on_given_up=interrupted.set) as beat:
            # what run monitoring does at a max runtime: cancel, terminate, mark failed
            instance.report_run_canceling(run, message="Canceling due to exceeding maximum")
            instance.report_run_failed(run, "Exceeded maximum runtime of 1 seconds.")
            wait_until = time.monotonic() + 10
            while not beat.gave_up and time.monotonic() < wait_until:
                time.sleep(0.05)
        assert beat.gave_up and not interrupted.is_set()
