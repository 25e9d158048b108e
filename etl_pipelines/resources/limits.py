"""Input limits resource: the bounds of a landed manifest, shared by the sensor and the run.

The sensor refuses a manifest over them before a run exists; the validate op checks the same
values again (the manifest may have changed). The shard stage's limits (bytes per file,
vertices per geometry, bytes per read batch) are the shard op's config (``ShardConfig``).
"""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field

from libs.manifest import ManifestLimits


class InputLimitsResource(ConfigurableResource):
    """Bounds of one manifest; ``docs/limits.md`` says why the defaults."""

    max_manifest_bytes: int = Field(
        default=ManifestLimits.max_bytes, ge=1, description="a manifest larger than this "
        "(size from the bucket listing) is refused without being read")
    max_files_per_manifest: int = Field(
        default=ManifestLimits.max_files, ge=1, description="entries in a manifest's 'files'")

    @property
    def manifest(self) -> ManifestLimits:
        return ManifestLimits(max_bytes=self.max_manifest_bytes,
                              max_files=self.max_files_per_manifest)
