"""Ops of the ingestion job, one module per stage."""
# No "from __future__ import annotations" in op/sensor modules: Dagster reads the
# parameter annotations at decoration time to find config and resources.
