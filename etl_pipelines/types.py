"""What the ops hand each other besides the stage descriptors of ``libs.descriptors``: the
batch plan every op reads, and the join results the publish op publishes."""

from pydantic import BaseModel, ConfigDict, model_validator

from libs.descriptors import StagedPart
from libs.manifest import Manifest
from libs.object_store import ObjectInfo


class PinnedObject(BaseModel):
    """One landing object's version as validated: every later read gets exactly this one."""

    model_config = ConfigDict(frozen=True)

    key: str
    etag: str
    size: int

    def info(self) -> ObjectInfo:
        return ObjectInfo(self.key, self.size, self.etag)


class BatchPlan(BaseModel):
    """What every later op needs to know about the batch."""

    model_config = ConfigDict(frozen=True)

    manifest: Manifest
    manifest_key: str
    folder: str
    # the validating run's; a re-execution reuses this plan, so ops stage under their own
    # run's prefix (libs.lake.run_prefix(context.run_id)), never one derived from this id
    run_id: str
    # the versions validated (the ledger's batch records them too); a plan staged before
    # pinning existed has none, and its re-execution reads what is landed now
    manifest_version: PinnedObject | None = None
    pinned: tuple[PinnedObject, ...] = ()

    def landing_key(self, path: str) -> str:
        return f"{self.folder}{path}"

    def pins(self) -> dict[str, ObjectInfo]:
        """Landing key -> the version to read."""
        return {pin.key: pin.info() for pin in self.pinned}


class JoinResult(BaseModel):
    """The join result, staged as GeoParquet parts."""

    model_config = ConfigDict(frozen=True)

    name: str
    rows: int
    parts: list[StagedPart]
    columns: list[str]
    crs: str


class JoinResults(BaseModel):
    """Every join's result, in the manifest's order; none for a batch without a join."""

    model_config = ConfigDict(frozen=True)

    joins: list[JoinResult] = []

    @model_validator(mode="before")
    @classmethod
    def _single_join_output(cls, data: object) -> object:
        # what the op stored before a batch could have several joins (one JoinResult): a
        # re-execution of such a run reads it as the one join it is
        if isinstance(data, dict) and "name" in data and "joins" not in data:
            return {"joins": [data]}
        return data
