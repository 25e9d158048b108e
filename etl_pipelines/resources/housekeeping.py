"""Housekeeping resources: where a run keeps its local scratch (and how much room it needs
there), and how long what finished runs leave in the staging bucket and the lake is kept.

Both are read by the janitor sensors (``etl_pipelines.sensors.janitor``) and the scratch
one by the shard op too; docs/housekeeping.md says why the defaults.
"""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field


class ScratchResource(ConfigurableResource):
    """The run process's local disk: ``<directory>/<run_id>/``, removed when the run ends and,
    after a kill, by the scratch janitor of the code server on the same host."""

    directory: str = Field(
        default="", description="root of the runs' scratch directories; empty: "
        "<system temp dir>/spatial-etl (TMPDIR), resolved when a run or tick starts")
    space_factor: float = Field(
        default=3.0, ge=1.0, description="free space the shard op needs before it downloads "
        "a batch, in multiples of the landed files' size (formats not compressed): the "
        "landed copy and the external sort's spill of the decoded rows; measured 1.8x for "
        "FlatGeobuf points (docs/housekeeping.md)")
    compressed_space_factor: float = Field(
        default=8.0, ge=1.0, description="the same for geoparquet and shapefile_zip files, "
        "whose rows decode to several times the file: measured 6.1x for zstd GeoParquet and "
        "4.4x for a zipped Shapefile of points")
    reserve_megabytes: int = Field(
        default=256, ge=0, description="free space (MiB) left to everything else on that disk, "
        "on top of space_factor x the landed bytes")
    grace_seconds: float = Field(
        default=60.0, ge=0, description="a run directory younger than this is never removed "
        "by the janitor (its run may be between creating and locking it)")

    def root(self) -> Path:
        return Path(self.directory or Path(tempfile.gettempdir()) / "spatial-etl")


class RetentionResource(ConfigurableResource):
    """How long the staging janitor keeps what finished runs leave, and how much it removes
    per tick."""

    retention_hours: float = Field(
        default=168.0, ge=0, description="a finished run's staging (chunks, results, op "
        "outputs) is kept this long after the last run of its re-execution group ended, so "
        "that 're-execute from failure' still finds it; a lake part no completion manifest "
        "lists is removed once older than this. Keep it well above the longest run "
        "(input_limits.max_run_seconds): a live publisher's parts must never be this old")
    max_deletions_per_tick: int = Field(
        default=2000, ge=1, description="staging objects, and lake parts, deleted per janitor "
        "tick at most (the rest waits for the next tick), so one tick stays short whatever "
        "piled up (multi-object deletes: two requests per 1,000)")
    lake_keys_per_tick: int = Field(
        default=5000, ge=1, description="lake keys examined per tick; the scan resumes from "
        "the sensor's cursor, so a tick costs this many keys, not the whole lake")

    @property
    def retention(self) -> timedelta:
        return timedelta(hours=self.retention_hours)
