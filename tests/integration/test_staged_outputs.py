"""Op outputs in the staging bucket are plain JSON, validated on read: an object planted where
an op output is expected (here a pickle that would create a marker file when unpickled) fails
the step that reads it with a clear error, and executes nothing."""

import json
import pathlib
import pickle

import pytest
from dagster import ReexecutionOptions, execute_job, instance_for_test, reconstructable

from libs.lake import completion_key
from libs.lake.keys import op_output_key
from tests.integration.pipeline import land_sample, request_for, sensor_tick
from tests.integration.reexecutable import ingest_batch_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class _Planted:
    """Unpickling this creates ``marker``: what an attacker's object would do instead."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_planted_pickle_where_an_op_output_is_expected_runs_nothing(
        stack_env, store, landing_store, tmp_path, batch_id):
    land_sample(landing_store, tmp_path, batch_id, n_points=5_000)
    marker = tmp_path / "unpickled-marker"
    with instance_for_test() as instance:
        request = request_for(sensor_tick(instance, focus=batch_id), batch_id)
        first = execute_job(reconstructable(ingest_batch_job), instance,
                            run_config=request.run_config, tags=request.tags)
        assert first.success
        key = op_output_key("dagster-io", [first.run_id, "load_and_join", "result"])
        stored = json.loads(store.get_bytes("etl-staging", key))  # what the op wrote: JSON
        assert [(j["name"], j["rows"]) for j in stored["joins"]] == [("points_per_country", 177)]
        store.put_bytes("etl-staging", key, pickle.dumps(_Planted(marker)),
                        "application/octet-stream")
        again = execute_job(
            reconstructable(ingest_batch_job), instance,
            reexecution_options=ReexecutionOptions(parent_run_id=first.run_id,
                                                   step_selection=["publish_batch"]))
    assert not again.success
    assert not marker.exists(), "the planted object was executed"
    failure = next(e for e in again.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "publish_batch"
    message = failure.event_specific_data.error.cause.message if \
        failure.event_specific_data.error.cause else failure.event_specific_data.error.message
    assert f"s3://etl-staging/{key}" in message
    assert "is not a valid JoinResults" in message and "re-execute from that step" in message
    # the batch the first run published is untouched
    assert store.exists("data-lake", completion_key(batch_id))
