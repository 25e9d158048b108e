"""The run's local scratch directory: one per run, locked for as long as the run's process
lives, and the free-space check made before a batch is downloaded into it.

``<root>/<run_id>/`` holds a ``.lock`` file on which the run keeps an exclusive ``flock``. The
kernel releases it when the process ends, however it ends (SIGKILL and OOM kills included),
so a janitor on the same host tells the scratch of a dead run from a live one by trying the
lock, whatever status the run still shows (``remove_dead_scratch``). A directory younger
than ``grace_seconds`` is left alone: its run may be between creating it and locking it.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from libs.errors import ScratchSpaceError

LOCK_NAME = ".lock"
#: Formats whose rows decode to several times the file (zstd/snappy columns, deflate).
COMPRESSED_FORMATS = frozenset({"geoparquet", "shapefile_zip"})
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")


def _check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):  # it becomes a directory name
        raise ValueError(f"run id {run_id!r} is not a run id (letters, digits and '-')")
    return run_id


@contextmanager
def run_scratch(root: Path, run_id: str) -> Iterator[Path]:
    """``root/run_id``, created and locked for the ``with`` block, removed when it ends."""
    directory = root / _check_run_id(run_id)
    while True:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = directory / LOCK_NAME
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # a janitor may have removed the directory while we waited for its lock
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)  # still locked: no janitor races us
        os.close(fd)


def remove_dead_scratch(root: Path, *, grace_seconds: float = 60.0,
                        limit: int = 100) -> list[str]:
    """Remove up to ``limit`` run directories under ``root`` whose lock no process holds;
    returns their run ids. Anything that is not a run directory is left alone."""
    if not root.is_dir():
        return []
    removed: list[str] = []
    for entry in sorted(root.iterdir()):
        if len(removed) >= limit:
            break
        if not entry.is_dir() or entry.is_symlink() or not _RUN_ID.match(entry.name):
            continue
        if time.time() - entry.stat().st_mtime < grace_seconds:
            continue
        try:
            fd = os.open(entry / LOCK_NAME, os.O_RDWR)
        except FileNotFoundError:  # its run died before locking it (older than the grace)
            fd = None
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live run holds it
            os.close(fd)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if fd is not None:
            os.close(fd)
        removed.append(entry.name)
    return removed


def scratch_bytes_needed(files: list[tuple[str, int]], *, factor: float,
                         compressed_factor: float) -> int:
    """Local scratch that sharding ``files`` ((format, bytes) each) needs at its peak: the
    landed copy plus the sort's spill, which holds the decoded rows; compressed formats decode
    to several times their size (docs/housekeeping.md has the measurements)."""
    return int(sum(size * (compressed_factor if fmt in COMPRESSED_FORMATS else factor)
                   for fmt, size in files))


def check_scratch_space(directory: Path, files: list[tuple[str, int]], *, factor: float,
                        compressed_factor: float, reserve_bytes: int, batch_id: str) -> int:
    """Raise ScratchSpaceError unless ``directory`` has room for sharding ``files``
    ((format, bytes) each; ``scratch_bytes_needed``) plus ``reserve_bytes``; returns the
    bytes free."""
    free = shutil.disk_usage(directory).free
    landed = sum(size for _, size in files)
    needed = scratch_bytes_needed(files, factor=factor,
                                  compressed_factor=compressed_factor) + reserve_bytes
    if free < needed:
        raise ScratchSpaceError(
            f"batch {batch_id!r}: its landed files total {landed:,} bytes and sharding them "
            f"needs about {needed:,} bytes of local scratch ({factor:g} x the files, "
            f"{compressed_factor:g} x those in a compressed format "
            f"({', '.join(sorted(COMPRESSED_FORMATS))}), plus a reserve of {reserve_bytes:,}), "
            f"but {directory} has {free:,} bytes free. Nothing was downloaded: free space "
            "there, point the scratch resource's directory at a larger disk, or land the data "
            "as several smaller batches; then re-execute")
    return free
