"""The one retry policy for calls to the object store and the ledger, in every stage.

``RetryPolicy`` (bounded attempts, exponential backoff with full jitter, a per-call deadline
and an overall deadline) is a plain picklable dataclass, so a Ray task retries with the same
policy as the run that submitted it. ``is_transient`` is the one place that says which errors
are worth another attempt (transport failures, 5xx, S3 throttling, MongoDB reconnects);
client errors (denied, missing key, bad request) are final. A transient error that outlives
the policy is raised as ``ServiceUnavailable`` (a ``ConnectionError``), with the original
chained, so callers and Ray's ``retry_exceptions`` see one type for "the service was down".
"""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

#: S3 error codes a server sends for a condition that passes (throttling, restarts).
TRANSIENT_S3_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError",
                                "RequestTimeout", "ServiceUnavailableException"})


class ServiceUnavailable(ConnectionError):
    """A service stayed unreachable (or kept failing transiently) for a whole retry budget."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying a call that fails transiently.

    ``attempts`` bounds the tries; backoff before try ``n + 1`` is a random delay in
    ``[0, min(max_backoff, base_backoff * 2**(n-1))]`` ("full jitter": many clients that fail
    together do not retry together). ``call_timeout`` is the transport timeout each try gets
    (connect and read), and ``deadline`` the total seconds a call may take with its retries:
    no sleep is started that would end past it.
    """

    attempts: int = 10
    base_backoff: float = 0.5
    max_backoff: float = 8.0
    call_timeout: float = 20.0
    deadline: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.base_backoff < 0 or self.max_backoff < self.base_backoff:
            raise ValueError("RetryPolicy needs 0 <= base_backoff <= max_backoff, got "
                             f"{self.base_backoff} and {self.max_backoff}")
        if self.deadline <= 0 or self.call_timeout <= 0:
            raise ValueError("RetryPolicy.deadline and call_timeout must be > 0 seconds")

    def backoff_caps(self) -> Iterator[float]:
        """The upper bound of each sleep between tries (``attempts - 1`` of them)."""
        for n in range(1, self.attempts):
            yield min(self.max_backoff, self.base_backoff * 2 ** (n - 1))

    def call(self, fn: Callable[[], T], *, what: str,
             rng: Callable[[float, float], float] = random.uniform,
             sleep: Callable[[float], None] = time.sleep,
             clock: Callable[[], float] = time.monotonic) -> T:
        """``fn()``, retried while it fails with an ``is_transient`` error and the budget
        lasts; ``what`` ("read s3://bucket/key") names the call in the final error."""
        started = clock()
        caps = self.backoff_caps()
        tries = 0
        while True:
            tries += 1
            try:
                return fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                cap = next(caps, None)
                delay = rng(0.0, cap) if cap is not None else 0.0
                if cap is None or clock() - started + delay > self.deadline:
                    raise ServiceUnavailable(
                        f"could not {what}: still failing after {tries} attempt(s) over "
                        f"{clock() - started:.1f} s ({describe(exc)}); the service is down or "
                        "unreachable: check it, then re-execute the run (the retry budget is "
                        f"{self.attempts} attempts / {self.deadline:g} s)") from exc
                log.warning("could not %s (attempt %d: %s); retrying in %.1f s", what, tries,
                            describe(exc), delay)
                sleep(delay)


def describe(exc: BaseException) -> str:
    """``Type: message`` of ``exc``, on one line."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` says the service was unreachable, slow or failing server-side, so
    the same call may succeed later; False for client errors and everything else."""
    if isinstance(exc, ServiceUnavailable):
        return False  # a retry budget already spent below us
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if module.startswith("pymongo"):
        return _mongo_transient(exc)
    if module.startswith("minio"):
        if name == "S3Error":
            return getattr(exc, "code", None) in TRANSIENT_S3_CODES
        if name == "ServerError":  # minio's non-XML 5xx answer
            return int(getattr(exc, "status_code", 500) or 500) >= 500
        return False
    if module.startswith("urllib3"):
        # MaxRetryError, ProtocolError, timeouts, NewConnectionError...: the transport
        return name not in {"LocationValueError", "LocationParseError", "ProxySchemeUnknown",
                            "HeaderParsingError", "DecodeError"}
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return True
    if isinstance(exc, OSError):  # socket errors that are not ConnectionError subclasses
        import errno
        return exc.errno in {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED,
                             errno.EPIPE, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                             errno.ENETUNREACH, errno.ENETDOWN}
    return False


def _mongo_transient(exc: BaseException) -> bool:
    from pymongo import errors

    if isinstance(exc, (errors.AutoReconnect, errors.ServerSelectionTimeoutError,
                        errors.NetworkTimeout, errors.ExecutionTimeout,
                        errors.WaitQueueTimeoutError)):
        return True  # AutoReconnect covers ConnectionFailure's network cases
    if isinstance(exc, errors.PyMongoError) and hasattr(exc, "has_error_label"):
        return exc.has_error_label("RetryableWriteError")
    return False
