"""Input limits resource: the bounds of a landed manifest, shared by the sensor and the run,
and the runtime bound the sensor tags each run with.

The sensor refuses a manifest over them before a run exists; the validate op checks the same
values again (the manifest may have changed). The shard stage's limits (bytes per file,
vertices per geometry, bytes per read batch) are the shard op's config (``ShardConfig``).
"""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field

from libs.manifest import ManifestLimits

#: Dagster's run tag (seconds) enforced by run monitoring (dagster.yaml `run_monitoring`).
MAX_RUNTIME_TAG = "dagster/max_runtime"
#: Six hours: far above a batch within the input limits, short enough that a run lost with its
#: container does not hold a run slot (and its batch) for a day.
DEFAULT_MAX_RUN_SECONDS = 6 * 3600


class InputLimitsResource(ConfigurableResource):
    """Bounds of one manifest; ``docs/limits.md`` says why the defaults."""

    max_manifest_bytes: int = Field(
        default=ManifestLimits.max_bytes, ge=1, description="a manifest larger than this "
        "(size from the bucket listing) is refused without being read")
    max_files_per_manifest: int = Field(
        default=ManifestLimits.max_files, ge=1, description="entries in a manifest's 'files'")
    max_run_seconds: int = Field(
        default=DEFAULT_MAX_RUN_SECONDS, ge=0, description="the dagster/max_runtime tag the "
        "manifest sensor puts on each run: run monitoring fails a run still going after this "
        "long, hung or lost with its process (0: no tag, no bound); docs/run-lifecycle.md")

    @property
    def manifest(self) -> ManifestLimits:
        return ManifestLimits(max_bytes=self.max_manifest_bytes,
                              max_files=self.max_files_per_manifest)

    @property
    def max_runtime_tags(self) -> dict[str, str]:
        """The run tag that bounds a run's wall time under run monitoring (none if 0)."""
        return {MAX_RUNTIME_TAG: str(self.max_run_seconds)} if self.max_run_seconds else {}
