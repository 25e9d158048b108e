"""Transformation steps and the per-chunk driver; pure functions, no Dagster, no Ray."""

from libs.transformations.chunk import ChunkTransformResult, transform_chunk_bytes
from libs.transformations.staged import transform_staged_chunk
from libs.transformations.steps import make_valid, reproject

__all__ = [
    "ChunkTransformResult",
    "make_valid",
    "reproject",
    "transform_chunk_bytes",
    "transform_staged_chunk",
]
