"""The manifest sensor's claimant (issue 26): a Dagster instance's id, made once and kept in
its run storage, and the tick's id; and what a pinned read says when a version changed."""

from dagster import DagsterInstance, SensorEvaluationContext, build_sensor_context

from etl_pipelines.sensors.manifests import INSTANCE_ID_KEY, claimant_of
from libs.errors import PinnedVersionChanged


def test_an_instance_keeps_one_claimant_id_and_another_instance_has_its_own():
    with DagsterInstance.ephemeral() as a, DagsterInstance.ephemeral() as b:
        first = claimant_of(build_sensor_context(instance=a))
        assert a.run_storage.get_cursor_values({INSTANCE_ID_KEY}) == {INSTANCE_ID_KEY:
                                                                      first.instance}
        assert claimant_of(build_sensor_context(instance=a)).instance == first.instance
        assert claimant_of(build_sensor_context(instance=b)).instance != first.instance


def test_the_tick_is_the_last_part_of_the_ticks_log_key():
    with DagsterInstance.ephemeral() as instance:
        # the log key the daemon passes: repository, sensor, tick id
        context = SensorEvaluationContext(instance_ref=None, instance=instance,
                                          log_key=["repo", "manifest_sensor", "4711"])
        assert claimant_of(context).tick == "4711"


def test_a_changed_version_names_the_object_both_versions_and_what_to_do():
    message = str(PinnedVersionChanged("s3://landing-zone/b/points.fgb", ("abc", 15_616),
                                       ("def", 22_536)))
    assert message.startswith("s3://landing-zone/b/points.fgb changed after the batch was "
                              "validated: pinned ETag 'abc' (15,616 bytes), now ETag 'def' "
                              "(22,536 bytes)")
    assert "under a new batch_id" in message
    gone = str(PinnedVersionChanged("s3://landing-zone/b/points.fgb", ("abc", 1), None))
    assert "pinned ETag 'abc' (1 bytes), now gone" in gone
