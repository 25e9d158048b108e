"""IO manager for op outputs: small descriptions kept as JSON in the staging bucket, validated
on read against the type the op declared.

Ops hand each other chunk indexes, never dataframes; keeping them in object storage (not on
local disk) lets a re-execution run in another process or container read them. The staging
bucket is shared with other components, so what is read back is data, never code: no pickle.
A foreign or tampered object fails the step that reads it, naming the object and what was
expected, before anything of it is used.
"""

from __future__ import annotations

from typing import Any

from dagster import ConfigurableIOManager, InputContext, OutputContext
from pydantic import Field, TypeAdapter, ValidationError

from etl_pipelines.resources.object_store import ObjectStoreResource
from libs.errors import StagingError
from libs.lake.keys import OP_OUTPUTS_FOLDER, op_output_key


def _declared_type(context: OutputContext | InputContext) -> Any:
    typing_type = context.dagster_type.typing_type
    if typing_type is Any:  # an output without a declared type cannot be validated on read
        raise StagingError(f"{context.step_key}: op outputs stored in the staging bucket need a "
                           "declared type (Out(SomeModel)); got none")
    return typing_type


class StagingIOManager(ConfigurableIOManager):
    """JSON op outputs under ``<staging_bucket>/<prefix>/<run_id>/<step>/<output>.json``."""

    object_store: ObjectStoreResource
    prefix: str = Field(default=OP_OUTPUTS_FOLDER, description="key prefix in the staging "
                        "bucket (the staging janitor cleans the default one only)")

    def _key(self, context: OutputContext) -> str:
        return op_output_key(self.prefix, context.get_identifier())

    def handle_output(self, context: OutputContext, obj: object) -> None:
        payload = TypeAdapter(_declared_type(context)).dump_json(obj)
        self.object_store.store.write_bytes(
            self.object_store.staging_bucket, self._key(context), payload, "application/json")

    def load_input(self, context: InputContext) -> object:
        expected = _declared_type(context)
        bucket, key = self.object_store.staging_bucket, self._key(context.upstream_output)
        raw = self.object_store.store.get_bytes(bucket, key)
        try:
            return TypeAdapter(expected).validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "(document)"
            raise StagingError(
                f"s3://{bucket}/{key}: the stored output of step "
                f"{context.upstream_output.step_key!r} is not a valid "
                f"{getattr(expected, '__name__', expected)} ({exc.error_count()} problem(s), first "
                f"at {where}: {first['msg']}); it was not written by this pipeline or was changed "
                "since. Nothing of it was used: re-execute from that step to write it again"
            ) from None
