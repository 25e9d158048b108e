"""Run lifecycle, offline: both instances monitor runs, the sensor bounds each run's runtime,
and the ledger names the cause of a run that run monitoring failed."""

import yaml

from devstack.dagster_local import DAGSTER_YAML
from devstack.layout import REPO
from etl_pipelines.resources import InputLimitsResource
from etl_pipelines.resources.limits import DEFAULT_MAX_RUN_SECONDS, MAX_RUNTIME_TAG
from libs.ledger import PROCESS_LOST_CAUSE, run_failure_cause


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
