"""The one retry policy: which errors are transient, and the backoff schedule and deadlines.

The clock and sleep are handed in, so the schedule is checked exactly and nothing waits.
"""

import errno
import pickle

import pytest
import urllib3
from minio.error import S3Error, ServerError
from pymongo import errors as mongo

from libs.object_store import ObjectStoreSettings
from libs.retry import RetryPolicy, ServiceUnavailable, is_transient


def s3_error(code: str) -> S3Error:
    return S3Error(None, code, f"{code} message", "/bucket/key", "req", "host")


def max_retry(reason: Exception) -> urllib3.exceptions.MaxRetryError:
    return urllib3.exceptions.MaxRetryError(None, "/bucket/key", reason)


TRANSIENT = {
    "connection refused": ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
    "connection reset": ConnectionResetError(errno.ECONNRESET, "reset"),
    "timeout": TimeoutError("timed out"),
    "OSError ECONNRESET": OSError(errno.ECONNRESET, "reset"),
    "urllib3 MaxRetryError": max_retry(ConnectionRefusedError("refused")),
    "urllib3 ProtocolError": urllib3.exceptions.ProtocolError("Connection aborted."),
    "urllib3 NewConnectionError": urllib3.exceptions.NewConnectionError(None, "refused"),
    "urllib3 ReadTimeoutError": urllib3.exceptions.ReadTimeoutError(None, "/k", "read timed out"),
    "minio ServerError 503": ServerError("bad gateway", 503),
    "S3 SlowDown": s3_error("SlowDown"),
    "S3 InternalError": s3_error("InternalError"),
    "S3 ServiceUnavailable": s3_error("ServiceUnavailable"),
    "mongo AutoReconnect": mongo.AutoReconnect("primary stepped down"),
    "mongo ServerSelectionTimeoutError": mongo.ServerSelectionTimeoutError("no servers"),
    "mongo NetworkTimeout": mongo.NetworkTimeout("socket timed out"),
}
FINAL = {
    "S3 AccessDenied": s3_error("AccessDenied"),
    "S3 NoSuchKey": s3_error("NoSuchKey"),
    "S3 NoSuchBucket": s3_error("NoSuchBucket"),
    "minio ServerError 400": ServerError("bad request", 400),
    "mongo DuplicateKeyError": mongo.DuplicateKeyError("E11000 duplicate key"),
    "mongo OperationFailure (auth)": mongo.OperationFailure("Authentication failed", code=18),
    "FileNotFoundError": FileNotFoundError(errno.ENOENT, "no such file"),
    "ValueError": ValueError("object too large"),
    "a spent retry budget": ServiceUnavailable("could not read: still failing"),
}


@pytest.mark.parametrize("name", TRANSIENT)
def test_transient_errors_are_retried(name):
    assert is_transient(TRANSIENT[name]), name


@pytest.mark.parametrize("name", FINAL)
def test_client_errors_and_everything_else_are_final(name):
    assert not is_transient(FINAL[name]), name


class FakeTime:
    """A clock that moves only when the policy sleeps (or a call takes ``call_seconds``)."""

    def __init__(self, call_seconds: float = 0.0):
        self.now = 0.0
        self.sleeps: list[float] = []
        self.call_seconds = call_seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def failing(times: int, error: Exception, clock: FakeTime | None = None):
    calls = []

    def call():
        calls.append(1)
        if clock is not None:
            clock.now += clock.call_seconds
        if len(calls) <= times:
            raise error
        return "done"

    return call, calls


def run(policy: RetryPolicy, call, fake: FakeTime, rng=lambda low, high: high):
    return policy.call(call, what="read s3://b/k", rng=rng, sleep=fake.sleep, clock=fake.clock)


def test_the_backoff_doubles_up_to_its_cap():
    policy = RetryPolicy(attempts=7, base_backoff=0.5, max_backoff=4.0, deadline=1000)
    assert list(policy.backoff_caps()) == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_a_transient_failure_is_retried_with_the_capped_schedule_until_it_succeeds():
    fake = FakeTime()
    call, calls = failing(4, ConnectionRefusedError("refused"))
    policy = RetryPolicy(attempts=10, base_backoff=0.5, max_backoff=2.0, deadline=1000)
    assert run(policy, call, fake) == "done"
    assert len(calls) == 5
    assert fake.sleeps == [0.5, 1.0, 2.0, 2.0]


def test_jitter_draws_each_sleep_between_zero_and_its_cap():
    fake = FakeTime()
    drawn = []

    def rng(low, high):
        drawn.append((low, high))
        return high / 4

    call, _ = failing(3, TimeoutError("timed out"))
    run(RetryPolicy(attempts=5, base_backoff=1.0, max_backoff=8.0, deadline=1000), call, fake,
        rng=rng)
    assert drawn == [(0.0, 1.0), (0.0, 2.0), (0.0, 4.0)]
    assert fake.sleeps == [0.25, 0.5, 1.0]


def test_attempts_bound_the_tries_and_the_final_error_names_the_call_and_chains_the_cause():
    fake = FakeTime()
    refused = ConnectionRefusedError("refused")
    call, calls = failing(100, refused)
    with pytest.raises(ServiceUnavailable, match=r"could not read s3://b/k: still failing after "
                                                 r"4 attempt\(s\).*ConnectionRefusedError") as info:
        run(RetryPolicy(attempts=4, base_backoff=0.1, max_backoff=1.0, deadline=1000), call, fake)
    assert len(calls) == 4 and len(fake.sleeps) == 3
    assert info.value.__cause__ is refused
    assert isinstance(info.value, ConnectionError)  # what Ray's retry_exceptions matches


def test_the_deadline_stops_the_retries_before_a_sleep_would_pass_it():
    fake = FakeTime(call_seconds=2.0)  # every try itself takes 2 s (a connect timeout)
    call, calls = failing(100, TimeoutError("connect timed out"), fake)
    policy = RetryPolicy(attempts=100, base_backoff=1.0, max_backoff=4.0, deadline=15.0)
    with pytest.raises(ServiceUnavailable):
        run(policy, call, fake)
    # tries at 0-2, 3-5, 7-9, 13-15: the next sleep (4 s) would end past 15 s
    assert fake.sleeps == [1.0, 2.0, 4.0]
    assert len(calls) == 4
    assert fake.now <= policy.deadline


def test_a_final_error_is_raised_at_once_unchanged():
    fake = FakeTime()
    denied = s3_error("AccessDenied")
    call, calls = failing(100, denied)
    with pytest.raises(S3Error) as info:
        run(RetryPolicy(), call, fake)
    assert info.value is denied and len(calls) == 1 and fake.sleeps == []


def test_nested_policies_do_not_multiply():
    """An inner budget that ran out is final for an outer policy around it."""
    fake = FakeTime()
    inner = RetryPolicy(attempts=3, base_backoff=0.1, max_backoff=0.1, deadline=100)
    call, calls = failing(100, ConnectionResetError("reset"))
    with pytest.raises(ServiceUnavailable):
        run(inner, lambda: run(inner, call, fake), fake)
    assert len(calls) == 3


@pytest.mark.parametrize("bad", [dict(attempts=0), dict(base_backoff=2.0, max_backoff=1.0),
                                 dict(deadline=0), dict(call_timeout=-1)])
def test_a_nonsensical_policy_is_refused(bad):
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**bad)


def test_the_policy_travels_with_the_store_settings_to_ray_workers():
    policy = RetryPolicy(attempts=3, deadline=5.0)
    settings = ObjectStoreSettings("127.0.0.1:9000", "key", "secret", retry=policy)
    assert pickle.loads(pickle.dumps(settings)).retry == policy
    assert pickle.loads(pickle.dumps(ServiceUnavailable("down"))).args == ("down",)
