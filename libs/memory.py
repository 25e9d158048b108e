"""Handing freed memory back to the operating system between units of work."""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

import pyarrow as pa


@cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Return what Arrow's memory pool and the C heap hold but no longer use.

    Both allocators keep freed pages for reuse, so a long-lived process (a Ray worker, the
    run's process) stays at the high-water mark of its largest unit of work, and on a shared
    machine those retained peaks add up. Called after each sharded layer and each chunk the
    load step COPYs; not in the Ray workers after every chunk task, whose successor reuses
    the pages (the transform op ends the idle workers once its stage is done:
    ``etl_pipelines.ray_exec.retire_workers``); costs a few milliseconds.
    """
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
