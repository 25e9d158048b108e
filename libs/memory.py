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
    the pages (the transform op ends the run's Ray job, and its workers, once its stage is
    done); costs a few milliseconds.
    """
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def use_jemalloc_pool() -> str:
    """Make jemalloc Arrow's default memory pool in this process when the default is
    pyarrow's own, mimalloc (a pool chosen with ``ARROW_DEFAULT_MEMORY_POOL=system`` is kept,
    and so is mimalloc where this pyarrow has no jemalloc); returns the default pool's
    backend name. Idempotent; buffers allocated before keep their own pool.

    For the run's process, which shards and loads: pyarrow's default, mimalloc, returns a freed
    segment to the system 10 ms after it empties, so a process that allocates and frees
    chunk-sized buffers all along faults fresh pages in again and again (each one expensive on
    a VM that hands freed pages back to its host), and it still held more: sharding 1M lines
    peaked at 530 MiB against 434 with jemalloc (whose freed pages decay over a second), and
    10M points at 381 against 340 MiB with 1 CPU-s less system time. The Ray workers keep
    mimalloc: there jemalloc cost a 250k-point task ~10% more CPU."""
    if pa.default_memory_pool().backend_name == "mimalloc":
        try:
            pa.set_memory_pool(pa.jemalloc_memory_pool())
        except NotImplementedError:  # a pyarrow built without jemalloc
            pass
    return pa.default_memory_pool().backend_name
