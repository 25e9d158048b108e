"""Run health: a run worker's heartbeat and the run launcher that reads it.

The daemon (and the webserver) load ``run_health.launcher`` from dagster.yaml, so this package
imports nothing but dagster and the standard library: the webserver/daemon image is light and
holds this package alone. ``docs/run-lifecycle.md`` says how a dead run is noticed.
"""
