"""The transform stage: the recipe steps a manifest declares (``libs.manifest.recipe``) as pure
per-chunk functions (``steps``; ``arrays``, the default recipe's fast path), checked up front
against a schema (``plan``), the per-chunk driver (``chunk``) and the object-storage task body
(``staged``). No Dagster, no Ray."""

from libs.transformations.chunk import ChunkTransformResult, read_chunk, transform_chunk_bytes
from libs.transformations.naming import normalized_names, safe_identifier
from libs.transformations.plan import plan_recipe
from libs.transformations.results import TransformResults, check_reject_fractions
from libs.transformations.staged import transform_staged_chunk
from libs.transformations.steps import (
    StepResult,
    add_row_ids,
    apply_step,
    cast,
    derive,
    drop_duplicates,
    drop_empty,
    filter_attribute,
    filter_bbox,
    force_2d,
    make_valid,
    normalize_column_names,
    promote_to_multi,
    rename,
    reproject,
    simplify,
)

__all__ = [
    "TransformResults",
    "check_reject_fractions",
    "ChunkTransformResult",
    "StepResult",
    "add_row_ids",
    "apply_step",
    "cast",
    "derive",
    "drop_duplicates",
    "drop_empty",
    "filter_attribute",
    "filter_bbox",
    "make_valid",
    "normalize_column_names",
    "normalized_names",
    "plan_recipe",
    "force_2d",
    "promote_to_multi",
    "read_chunk",
    "rename",
    "reproject",
    "safe_identifier",
    "simplify",
    "transform_chunk_bytes",
    "transform_staged_chunk",
]
