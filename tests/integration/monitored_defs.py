"""The code location of etl_pipelines.definitions with a short run max runtime, for the run
monitoring tests: their daemon's sensor tags each run with MONITORED_MAX_RUN_SECONDS."""

import os

from dagster import Definitions

from etl_pipelines import definitions
from etl_pipelines.resources import InputLimitsResource

# Read when the test's code server imports this module: a test-only location, started by the
# test with the value in its environment.
MAX_RUN_SECONDS = int(os.environ.get("MONITORED_MAX_RUN_SECONDS", "60"))

# (through the module: a second Definitions object at this module's scope would be ambiguous)
defs = Definitions(
    jobs=definitions.defs.jobs,
    sensors=definitions.defs.sensors,
    resources={**definitions.defs.resources,
               "input_limits": InputLimitsResource(max_run_seconds=MAX_RUN_SECONDS)},
)
