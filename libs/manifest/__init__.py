"""The manifest stage: what a data team declares when it lands a batch (``model``), the
recipe steps it may declare per layer (``recipe``), parsing a landed document (``parse``)
and the published JSON Schema (``schema``; ``python -m libs.manifest`` prints it)."""

from libs.manifest.model import (
    CARRY_PREFIX,
    DISTANCE_PREDICATES,
    FAMILY_SUFFIXES,
    MANIFEST_FILENAME,
    REJECTS_SUFFIX,
    RESERVED_DATASETS,
    Aggregation,
    CarryColumn,
    CsvGeometry,
    DataFile,
    InputFormat,
    Manifest,
    SpatialJoin,
    cross_field_problems,
    dataset_name_problems,
    distance_unit_problem,
)
from libs.manifest.parse import ManifestLimits, batch_folder, parse_manifest
from libs.manifest.recipe import bad_geometry_policy
from libs.manifest.schema import manifest_json_schema

__all__ = [
    "CARRY_PREFIX",
    "FAMILY_SUFFIXES",
    "DISTANCE_PREDICATES",
    "MANIFEST_FILENAME",
    "REJECTS_SUFFIX",
    "RESERVED_DATASETS",
    "Aggregation",
    "CarryColumn",
    "CsvGeometry",
    "DataFile",
    "InputFormat",
    "Manifest",
    "ManifestLimits",
    "SpatialJoin",
    "bad_geometry_policy",
    "batch_folder",
    "cross_field_problems",
    "dataset_name_problems",
    "distance_unit_problem",
    "manifest_json_schema",
    "parse_manifest",
]
