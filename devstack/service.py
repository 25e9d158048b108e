"""What every service of the stack offers (spawn, wait until ready, stop, status, purge)."""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class StackError(RuntimeError):
    """A service failed to start, stop or answer; the message points at its log."""


def say(message: str) -> None:
    print(message, flush=True)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.3, *, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Status:
    name: str
    pid: int | None
    address: str
    ready: bool
    log: Path


class Service(abc.ABC):
    """One component of the stack."""

    name: str
    address: str

    @abc.abstractmethod
    def spawn(self) -> bool:
        """Launch the service unless it runs already (without waiting); True if launched now."""

    @abc.abstractmethod
    def wait_ready(self) -> None:
        """Block until the readiness check passes; StackError (pointing at the log) if not."""

    @abc.abstractmethod
    def stop(self) -> bool:
        """Stop the service and wait for it to exit; False if it was not running."""

    @abc.abstractmethod
    def status(self) -> list[Status]:
        """One row per process, with a live readiness check."""

    @abc.abstractmethod
    def state_paths(self) -> list[Path]:
        """Everything the service keeps on disk (data, logs, sockets): what ``down --purge``
        removes once the service has stopped."""
