"""Retries of external calls: transient only, exponential backoff with jitter, Retry-After."""

import pytest

from config.errors import ExternalServiceError
from config.retry import call_with_retry


class Flaky:
    def __init__(self, failures: list[Exception], result="ok"):
        self.failures = list(failures)
        self.calls = 0
        self.result = result

    def __call__(self):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return self.result


def transient(retry_after=None):
    return ExternalServiceError("busy", service="llm", transient=True, retry_after=retry_after)


def test_transient_errors_are_retried_until_success():
    sleeps: list[float] = []
    fn = Flaky([transient(), transient()])
    assert call_with_retry(fn, sleep=sleeps.append, initial=0.5) == "ok"
    assert fn.calls == 3
    assert len(sleeps) == 2
    # Exponential with jitter: each wait within [base, base + jitter].
    assert 0.5 <= sleeps[0] <= 1.0
    assert 1.0 <= sleeps[1] <= 1.5


def test_permanent_errors_are_not_retried():
    fn = Flaky([ExternalServiceError("bad key", service="runpod", transient=False)])
    with pytest.raises(ExternalServiceError, match="bad key"):
        call_with_retry(fn, sleep=lambda s: None)
    assert fn.calls == 1


def test_other_exceptions_are_not_retried():
    fn = Flaky([ValueError("bug")])
    with pytest.raises(ValueError):
        call_with_retry(fn, sleep=lambda s: None)
    assert fn.calls == 1


def test_retry_after_is_honoured_when_longer_than_the_backoff():
    sleeps: list[float] = []
    call_with_retry(Flaky([transient(retry_after=7)]), sleep=sleeps.append, initial=0.1)
    assert sleeps == [7.0]


def test_gives_up_after_the_last_attempt_with_the_last_error():
    fn = Flaky([transient() for _ in range(10)])
    with pytest.raises(ExternalServiceError):
        call_with_retry(fn, attempts=3, sleep=lambda s: None)
    assert fn.calls == 3
