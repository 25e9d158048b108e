"""The one small exception hierarchy raised by every stage in ``libs``.

Messages follow one rule: say what was received, what was expected, and how to
fix it, naming the batch, file, layer, row or field involved.
"""

from __future__ import annotations


class SpatialEtlError(Exception):
    """Base class of every error raised by ``libs``."""


class ConfigError(SpatialEtlError):
    """A service setting (endpoint, credentials, bucket) is malformed."""


class ManifestError(SpatialEtlError):
    """A batch manifest is not valid; ``errors`` lists every problem found."""

    def __init__(self, manifest_key: str, errors: list[str]):
        self.manifest_key = manifest_key
        self.errors = list(errors)
        listing = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"manifest {manifest_key!r} is invalid ({len(errors)} problem(s)):\n{listing}")


class InputDataError(SpatialEtlError):
    """A landed data file cannot be read or does not match what the manifest declares."""


class ScratchSpaceError(SpatialEtlError):
    """The run's local scratch directory has too little free space for the batch."""


class TransformError(SpatialEtlError):
    """A transformation step failed on a chunk."""


class LoadError(SpatialEtlError):
    """Loading chunks into PostGIS or running a join failed."""


class PublishError(SpatialEtlError):
    """Exporting to the data lake failed; nothing of the batch was published."""


class PublishConflictError(PublishError):
    """Another run switched the batch's completion manifest while this one was publishing."""


class ReconciliationError(SpatialEtlError):
    """Row counts do not add up between two stages."""


class StagingError(SpatialEtlError):
    """Something read back from the staging bucket is not what the pipeline wrote there."""
