"""IO manager for op outputs: small pickled descriptions in the staging bucket.

Ops hand each other chunk indexes, never dataframes; storing them in object storage (not
on local disk) lets a re-execution run in another process or container read them.
"""

from __future__ import annotations

import pickle

from dagster import ConfigurableIOManager, InputContext, OutputContext
from pydantic import Field

from etl_pipelines.resources.object_store import ObjectStoreResource
from libs.lake.keys import op_output_key


class StagingIOManager(ConfigurableIOManager):
    """Pickles op outputs under ``<staging_bucket>/<prefix>/<run_id>/<step>/<output>``."""

    object_store: ObjectStoreResource
    prefix: str = Field(default="dagster-io", description="key prefix in the staging bucket")

    def _key(self, context: OutputContext) -> str:
        return op_output_key(self.prefix, context.get_identifier())

    def handle_output(self, context: OutputContext, obj: object) -> None:
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        self.object_store.store.write_bytes(
            self.object_store.staging_bucket, self._key(context), payload,
            "application/octet-stream")

    def load_input(self, context: InputContext) -> object:
        key = self._key(context.upstream_output)
        return pickle.loads(self.object_store.store.get_bytes(self.object_store.staging_bucket, key))
