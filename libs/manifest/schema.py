"""The manifest's published JSON Schema (``schemas/manifest.schema.json``), generated from the
models; ``python -m libs.manifest`` prints it and a test keeps the file equal."""

from __future__ import annotations

from libs.manifest.model import Manifest


def manifest_json_schema() -> dict:
    """The published JSON Schema of the manifest."""
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://spatial-etl.example/schemas/manifest.schema.json"
    return schema
