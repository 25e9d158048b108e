"""Parsing a landed manifest document: every problem listed at once, each naming its field,
within the declared bounds of :class:`ManifestLimits`. Any bytes at all give a Manifest or a
ManifestError: nesting depth is bounded before ``json`` recurses."""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass

from pydantic import ValidationError

from libs.errors import ManifestError
from libs.manifest.model import Manifest, cross_field_problems

#: Deepest nesting of ``[``/``{`` accepted; a real manifest needs about 5 levels, and the json
#: module recurses once per level (200,000 levels raise RecursionError).
MAX_NESTING = 32
# a JSON string, escapes included (the unrolled form does not backtrack)
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def nesting_too_deep(text: str, limit: int = MAX_NESTING) -> bool:
    """Whether ``text`` nests ``[``/``{`` deeper than ``limit`` outside strings (linear, no
    recursion: run before ``json.loads``)."""
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub('""', text)):
        if match.group() in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _decode(raw: bytes, manifest_key: str) -> object:
    """The JSON document in ``raw``, or ManifestError saying why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(manifest_key, [
            f"not valid UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start:,} ({exc.reason}); "
            "a manifest is a UTF-8 JSON document: re-save it as UTF-8"]) from None
    if nesting_too_deep(text):
        raise ManifestError(manifest_key, [
            f"nesting deeper than {MAX_NESTING} levels of '[' and '{{'; a manifest is an object "
            "of a few levels: fix the document"])
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(manifest_key, [
            f"not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"]) from None
    except (RecursionError, ValueError) as exc:  # the pre-scan should make this unreachable
        raise ManifestError(manifest_key, [f"not parseable as JSON: {exc!r}"]) from None


def _describe(error: dict) -> str:
    location = ".".join(str(part) for part in error["loc"]) or "(manifest)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("missing", "extra_forbidden"):
        return f"{location}: {message}"
    received = error.get("input")
    if isinstance(received, dict | list):
        return f"{location}: {message}"
    return f"{location}: {message} (received {received!r})"


@dataclass(frozen=True)
class ManifestLimits:
    """Bounds of one manifest (``docs/limits.md`` says why these defaults).

    * ``max_bytes``: the document's size; the sensor checks it from the listing, before
      reading the object (1 MiB holds a few thousand file entries and recipes).
    * ``max_files``: entries in ``files``; each is downloaded, probed and sharded in turn by
      one run, and the ledger keeps the manifest in one document.
    """

    max_bytes: int = 2**20
    max_files: int = 1_000

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_files"):
            if getattr(self, name) < 1:
                raise ValueError(f"ManifestLimits.{name} must be >= 1, got {getattr(self, name)}")

    def size_problem(self, size: int) -> str | None:
        """Why a manifest of ``size`` bytes is refused, or None."""
        if size <= self.max_bytes:
            return None
        return (f"the manifest is {size:,} bytes; the limit is {self.max_bytes:,} bytes: split the "
                "batch into several manifests")


def parse_manifest(raw: bytes, manifest_key: str,
                   limits: ManifestLimits | None = None) -> Manifest:
    """Parse and validate a manifest; raise :class:`ManifestError` listing every problem."""
    limits = limits or ManifestLimits()
    too_big = limits.size_problem(len(raw))
    if too_big:
        raise ManifestError(manifest_key, [too_big])
    document = _decode(raw, manifest_key)
    files = document.get("files") if isinstance(document, dict) else None
    too_many = []
    if isinstance(files, list) and len(files) > limits.max_files:
        too_many = [f"files: {len(files):,} files listed; the limit is {limits.max_files:,} per "
                    "manifest: split the batch into several manifests"]
    try:
        manifest = Manifest.model_validate(document)
    except ValidationError as exc:
        errors = too_many + [_describe(e) for e in exc.errors()]
        errors += [p for p in cross_field_problems(document) if not any(p in e for e in errors)]
        raise ManifestError(manifest_key, errors) from None
    if too_many:
        raise ManifestError(manifest_key, too_many)
    return manifest


def batch_folder(manifest_key: str) -> str:
    """The key prefix the manifest's relative paths resolve against ('' at bucket root)."""
    folder = posixpath.dirname(manifest_key)
    return f"{folder}/" if folder else ""
