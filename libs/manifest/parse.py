"""Parsing a landed manifest document: every problem listed at once, each naming its field."""

from __future__ import annotations

import json
import posixpath

from pydantic import ValidationError

from libs.errors import ManifestError
from libs.manifest.model import Manifest, cross_field_problems


def _describe(error: dict) -> str:
    location = ".".join(str(part) for part in error["loc"]) or "(manifest)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("missing", "extra_forbidden"):
        return f"{location}: {message}"
    received = error.get("input")
    if isinstance(received, dict | list):
        return f"{location}: {message}"
    return f"{location}: {message} (received {received!r})"


def parse_manifest(raw: bytes, manifest_key: str) -> Manifest:
    """Parse and validate a manifest; raise :class:`ManifestError` listing every problem."""
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(manifest_key, [f"not valid UTF-8 JSON: {exc}"]) from None
    try:
        return Manifest.model_validate(document)
    except ValidationError as exc:
        errors = [_describe(e) for e in exc.errors()]
        errors += [p for p in cross_field_problems(document) if not any(p in e for e in errors)]
        raise ManifestError(manifest_key, errors) from None


def batch_folder(manifest_key: str) -> str:
    """The key prefix the manifest's relative paths resolve against ('' at bucket root)."""
    folder = posixpath.dirname(manifest_key)
    return f"{folder}/" if folder else ""
