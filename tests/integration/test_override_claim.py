"""A batch id starts one run: a run launched by hand (the launchpad: no claim token from the
manifest sensor, no re-execution tags) for a batch the ledger already holds fails in
validate_batch, unless it carries the override tag, which is logged and recorded.

Each run here stops after validate_batch (op selection): the claim is all that is tested."""

import pytest
from dagster import DagsterInstance, ReexecutionOptions, execute_job, instance_for_test, reconstructable

from etl_pipelines.definitions import defs
from libs.ledger import CLAIM_TOKEN_TAG, OVERRIDE_CLAIM_TAG
from tests.integration.pipeline import land_sample, request_for, sensor_tick
from tests.integration.reexecutable import ingest_batch_job

pytestmark = pytest.mark.integration


def validate_only(instance: DagsterInstance, run_config: dict, tags: dict):
    job = defs.resolve_job_def("ingest_batch")
    return job.execute_in_process(
        run_config=run_config,
        instance=instance,
        tags=tags,
        op_selection=["validate_batch"],
        raise_on_error=False,
    )


def failure_message(result) -> str:
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "validate_batch"
    return failure.event_specific_data.error.message


def test_a_hand_launched_run_needs_the_override_tag(stack_env, landing_store, ledger, tmp_path, batch_id):
    land_sample(landing_store, tmp_path, batch_id, n_points=100)
    with DagsterInstance.ephemeral() as instance:
        request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
        assert CLAIM_TOKEN_TAG in request.tags
        first = validate_only(instance, request.run_config, request.tags)
        assert first.success
        assert ledger.batch(batch_id)["run_ids"] == [first.run_id]

        by_hand = {"batch_id": batch_id}
        refused = validate_only(instance, request.run_config, by_hand)
        assert not refused.success
        message = failure_message(refused)
        assert batch_id in message and first.run_id in message and OVERRIDE_CLAIM_TAG in message

        # the sensor's token, copied from the first run's tags, was spent by that run
        copied = validate_only(instance, request.run_config, dict(request.tags))
        assert not copied.success and OVERRIDE_CLAIM_TAG in failure_message(copied)
        assert ledger.batch(batch_id)["run_ids"] == [first.run_id]

        reason = "reprocess after the CRS fix, ticket 123"
        forced = validate_only(instance, request.run_config, {**by_hand, OVERRIDE_CLAIM_TAG: reason})
        assert forced.success
        warnings = [
            e.user_message
            for e in instance.all_logs(forced.run_id)
            if e.level >= 30 and OVERRIDE_CLAIM_TAG in (e.user_message or "")
        ]
        assert warnings and reason in warnings[0]
    batch = ledger.batch(batch_id)
    assert batch["run_ids"] == [first.run_id, forced.run_id]
    assert [(o["run_id"], o["reason"]) for o in batch["overrides"]] == [(forced.run_id, reason)]
    assert ledger.run(forced.run_id)["override_claim"] == reason


def test_a_hand_launched_run_for_a_new_batch_claims_it(stack_env, landing_store, ledger, tmp_path, batch_id):
    """No claim yet: the run claims the batch id, and the sensor then starts no second run."""
    land_sample(landing_store, tmp_path, batch_id, n_points=100)
    manifest_key = f"{batch_id}/manifest.json"
    config = {"ops": {"validate_batch": {"config": {"manifest_key": manifest_key, "batch_id": batch_id}}}}
    with DagsterInstance.ephemeral() as instance:
        run = validate_only(instance, config, {"batch_id": batch_id})
        assert run.success
        assert ledger.batch(batch_id)["run_ids"] == [run.run_id]
        assert request_for(sensor_tick(instance, focus=batch_id), batch_id) is None


def test_a_reexecution_of_the_batchs_run_needs_no_override(
    stack_env, landing_store, ledger, tmp_path, batch_id
):
    land_sample(landing_store, tmp_path, batch_id, n_points=100)
    with instance_for_test() as instance:
        request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
        first = execute_job(
            reconstructable(ingest_batch_job),
            instance,
            run_config=request.run_config,
            tags=request.tags,
            op_selection=["validate_batch"],
        )
        assert first.success
        again = execute_job(
            reconstructable(ingest_batch_job),
            instance,
            reexecution_options=ReexecutionOptions(
                parent_run_id=first.run_id, step_selection=["validate_batch"]
            ),
        )
        assert again.success
    assert ledger.batch(batch_id)["run_ids"] == [first.run_id, again.run_id]
