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


class PinnedVersionChanged(InputDataError):
    """A landed object is not the version the batch pinned when it was validated."""

    def __init__(self, uri: str, pinned: tuple[str, int], now: tuple[str, int] | None):
        self.uri, self.pinned, self.now = uri, pinned, now
        was = f"pinned ETag {pinned[0]!r} ({pinned[1]:,} bytes)"
        is_now = f"now ETag {now[0]!r} ({now[1]:,} bytes)" if now else "now gone"
        super().__init__(
            f"{uri} changed after the batch was validated: {was}, {is_now}; a batch reads "
            "exactly the versions it validated and landed objects are never changed in "
            "place: land the data again under a new batch_id (a new folder with its manifest); "
            "if an earlier run of this batch failed on that file and you landed its fix, "
            "re-execute all steps instead (validate pins the fix), not from failure")


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
