"""Typed Dagster resources: each wraps one service; settings come from EnvVar where wired."""

from etl_pipelines.resources.housekeeping import RetentionResource, ScratchResource
from etl_pipelines.resources.io_manager import StagingIOManager
from etl_pipelines.resources.ledger import LedgerResource
from etl_pipelines.resources.limits import InputLimitsResource
from etl_pipelines.resources.object_store import ObjectStoreResource
from etl_pipelines.resources.postgis import PostGISResource
from etl_pipelines.resources.ray import RayResource

__all__ = [
    "InputLimitsResource",
    "LedgerResource",
    "ObjectStoreResource",
    "PostGISResource",
    "RayResource",
    "RetentionResource",
    "ScratchResource",
    "StagingIOManager",
]
