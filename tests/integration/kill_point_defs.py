"""Test code location: etl_pipelines' definitions with a manifest sensor (same name, same
evaluation) that SIGKILLs the test's daemon at a chosen point of a tick, and a run
coordinator that kills the daemon right after a run request is stored.

The test arms one kill at a time by writing ``{"point", "batch", "pid": <daemon pid>}`` to
the file named by KILL_POINT_FILE; the first evaluation that reaches that point with the
batch in view removes the file and kills: ``before_claim`` (the batch's manifest landed,
nothing claimed), ``after_claim`` (the batch claimed, the tick's result never reaches the
daemon), ``after_run_stored`` (the daemon
itself, in ``KillingRunCoordinator.submit_run``, once the run is in its run storage, before
the tick is finished). Production code has no hook: everything is wrapped here.
"""

from dagster import Definitions, SensorEvaluationContext, sensor

from etl_pipelines import definitions
from etl_pipelines.jobs.ingest import ingest_batch
from etl_pipelines.resources import InputLimitsResource, LedgerResource, ObjectStoreResource
from etl_pipelines.sensors.manifests import manifest_sensor
from libs.manifest import MANIFEST_FILENAME
from tests.integration.kill_points import kill_if_armed


@sensor(name="manifest_sensor", job=ingest_batch, minimum_interval_seconds=2,
        description="manifest_sensor with test kill points")
def killable_manifest_sensor(
    context: SensorEvaluationContext, object_store: ObjectStoreResource, ledger: LedgerResource,
    input_limits: InputLimitsResource,
):
    landed = {o.key.split("/", 1)[0] for o in object_store.store.list(object_store.landing_bucket)
              if o.key.endswith("/" + MANIFEST_FILENAME)}
    kill_if_armed("before_claim", landed)
    # the context carries this sensor's resources: the same keys the real one takes
    result = manifest_sensor(context)
    kill_if_armed("after_claim", {r.run_key for r in getattr(result, "run_requests", None) or []})
    return result


defs = Definitions(
    jobs=definitions.defs.jobs,
    sensors=[killable_manifest_sensor],
    resources=definitions.defs.resources,
)
