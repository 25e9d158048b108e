"""The one reader and writer of env files: ``export KEY='value'`` lines a shell can source
(``.state/stack.env``), and plain ``KEY=value`` lines (``.env.example`` for compose)."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path


def quote(value: str) -> str:
    """``value`` in single quotes, safe to source from a POSIX shell."""
    return "'" + value.replace("'", "'\\''") + "'"


def write_env_file(path: Path, values: Mapping[str, str], header: str) -> None:
    """Write ``export KEY='value'`` lines, readable by the owner only (values hold secrets)."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines += [f"export {key}={quote(value)}" for key, value in values.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def read_env_file(path: Path) -> dict[str, str]:
    """``{KEY: value}`` from ``[export] KEY=value`` lines (shell quoting, ``#`` comments)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            words = words[1:]
        for word in words:
            key, sep, value = word.partition("=")
            if sep:
                values[key] = value
    return values
