"""What the ops hand each other besides the stage descriptors of ``libs.descriptors``: the
batch plan every op reads, and the join result the publish op publishes."""

from pydantic import BaseModel, ConfigDict

from libs.descriptors import StagedPart
from libs.manifest import Manifest


class BatchPlan(BaseModel):
    """What every later op needs to know about the batch."""

    model_config = ConfigDict(frozen=True)

    manifest: Manifest
    manifest_key: str
    folder: str
    # the validating run's; a re-execution reuses this plan, so ops stage under their own
    # run's prefix (libs.lake.run_prefix(context.run_id)), never one derived from this id
    run_id: str

    def landing_key(self, path: str) -> str:
        return f"{self.folder}{path}"


class JoinResult(BaseModel):
    """The join result, staged as GeoParquet parts."""

    model_config = ConfigDict(frozen=True)

    name: str
    rows: int
    parts: list[StagedPart]
    columns: list[str]
    crs: str
