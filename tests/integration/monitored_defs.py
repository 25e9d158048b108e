"""The code location of etl_pipelines.definitions for the run monitoring tests: their daemon's
sensor tags each run with MONITORED_MAX_RUN_SECONDS, and a run can be made to pause inside a
stage, so that a test kills it there and nowhere else.

MONITORED_PAUSE_PLAN names a JSON file {batch_id: stage}; a run of a listed batch writes
``<batch_id>.paused`` beside that file when it reaches its stage and sleeps until it is killed.
The pause points wrap, in this test-only location's process alone, the call each stage makes:
shard before sharding the downloaded files, transform before submitting its Ray tasks, load
right after creating the run's PostGIS schema, join before the join query (the layers
loaded and committed), publish before the completion manifest (the parts copied).
"""

import functools
import json
import os
import time
from pathlib import Path

from dagster import Definitions, OpExecutionContext

import libs.lake.publish
import libs.postgis.batch
from etl_pipelines import definitions
from etl_pipelines.ops import shard, transform
from etl_pipelines.resources import InputLimitsResource

# Read when the test's code server imports this module: a test-only location, started by the
# test with the value in its environment.
MAX_RUN_SECONDS = int(os.environ.get("MONITORED_MAX_RUN_SECONDS", "60"))
PAUSE_PLAN = os.environ.get("MONITORED_PAUSE_PLAN")
STAGES = ("shard", "transform", "load", "join", "publish")


def pause_if_planned(stage: str) -> None:
    """Sleep for ever (until killed) if this run's batch is planned to pause in ``stage``."""
    batch_id = OpExecutionContext.get().run.tags.get("batch_id")
    plan = json.loads(Path(PAUSE_PLAN).read_text())
    if plan.get(batch_id) != stage:
        return
    marker = Path(PAUSE_PLAN).parent / f"{batch_id}.paused"
    marker.write_text(json.dumps({"stage": stage, "pid": os.getpid()}))
    while True:
        time.sleep(1)


def pausing(stage: str, call, after: bool = False):
    @functools.wraps(call)
    def wrapper(*args, **kwargs):
        if not after:
            pause_if_planned(stage)
        result = call(*args, **kwargs)
        if after:
            pause_if_planned(stage)
        return result
    return wrapper


if PAUSE_PLAN:
    shard.shard_landed_batch = pausing("shard", shard.shard_landed_batch)
    transform.run_bounded = pausing("transform", transform.run_bounded)
    libs.postgis.batch.create_schema = pausing("load", libs.postgis.batch.create_schema,
                                               after=True)
    libs.postgis.batch.run_spatial_join = pausing("join", libs.postgis.batch.run_spatial_join)
    libs.lake.publish.put_completion_manifest = pausing(
        "publish", libs.lake.publish.put_completion_manifest)

# (through the module: a second Definitions object at this module's scope would be ambiguous)
defs = Definitions(
    jobs=definitions.defs.jobs,
    sensors=definitions.defs.sensors,
    resources={**definitions.defs.resources,
               "input_limits": InputLimitsResource(max_run_seconds=MAX_RUN_SECONDS)},
)
