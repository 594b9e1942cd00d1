"""Retries for external calls: transient errors only, exponential backoff with jitter,
and a server's Retry-After honoured when it asks for longer. Built on tenacity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from config.errors import ExternalServiceError

T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, ExternalServiceError) and exc.transient


class _WaitHonouringRetryAfter:
    def __init__(self, initial: float, maximum: float):
        self._backoff = wait_exponential_jitter(multiplier=initial, max=maximum, jitter=initial)
        self._maximum = maximum

    def __call__(self, state: RetryCallState) -> float:
        delay = self._backoff(state)
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after:
            delay = max(delay, min(float(retry_after), self._maximum))
        return delay


def call_with_retry(
    fn: Callable[[], T],
    *,
    attempts: int = 5,
    initial: float = 0.5,
    maximum: float = 30.0,
    deadline: float | None = None,
    sleep: Callable[[float], None] | None = None,
) -> T:
    """Call ``fn`` and retry it while it raises a transient ExternalServiceError.

    Permanent errors and any other exception propagate at once; after the last attempt
    the last transient error propagates unchanged.
    """
    stop = stop_after_attempt(attempts)
    if deadline is not None:
        stop = stop | stop_after_delay(deadline)
    kwargs = {"sleep": sleep} if sleep is not None else {}
    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        wait=_WaitHonouringRetryAfter(initial, maximum),
        stop=stop,
        reraise=True,
        **kwargs,
    )
    return retrying(fn)
