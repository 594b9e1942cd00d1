"""Domain exceptions and the one error envelope of the API.

Every error leaves the API as::

    {"error": {"code": "...", "message": "...", "details": {...}, "request_id": "..."}}

Services raise the exceptions below; ``config.api`` maps them (and django-ninja's own
errors) to this shape in one place.
"""

from __future__ import annotations

from typing import Any


class CrucibleError(Exception):
    """Base of every error the platform reports to a user, with its HTTP status."""

    status_code = 400
    code = "bad_request"
    default_message = "The request could not be processed."

    def __init__(self, message: str | None = None, *, details: Any = None, code: str | None = None):
        self.message = message or self.default_message
        self.details = details if details is not None else {}
        if code:
            self.code = code
        super().__init__(self.message)


class InvalidInput(CrucibleError):
    status_code = 422
    code = "validation_error"
    default_message = "The request is not valid."


class NotAuthenticated(CrucibleError):
    status_code = 401
    code = "not_authenticated"
    default_message = "Authentication required: send 'Authorization: Token <key>'."


class PermissionDenied(CrucibleError):
    status_code = 403
    code = "permission_denied"
    default_message = "Your role does not allow this action."


class NotFound(CrucibleError):
    status_code = 404
    code = "not_found"
    default_message = "Not found."


class Conflict(CrucibleError):
    status_code = 409
    code = "conflict"
    default_message = "The request conflicts with the current state."


class RateLimited(CrucibleError):
    status_code = 429
    code = "rate_limited"
    default_message = "Too many requests."

    def __init__(self, message: str | None = None, *, retry_after: int, details: Any = None):
        self.retry_after = max(1, int(retry_after))
        super().__init__(message, details=details or {"retry_after": self.retry_after})


class QueueFull(CrucibleError):
    """Backpressure: the queue the work would go to is past its limit (config/backpressure.py)."""

    status_code = 503
    code = "queue_full"
    default_message = "The work queue is full; submit again later."

    def __init__(self, message: str | None = None, *, retry_after: int, details: Any = None):
        self.retry_after = max(1, int(retry_after))
        super().__init__(message, details=details)


class ExternalServiceError(CrucibleError):
    """A call to something outside Crucible failed (RunPod, S3, an LLM API, Slack...).

    ``transient`` errors (timeouts, 429, 5xx) may succeed when retried; permanent ones
    (bad credentials, invalid request) never will. Only transient ones are retried.
    """

    status_code = 502
    code = "external_service_error"
    default_message = "An external service failed."

    def __init__(
        self,
        message: str | None = None,
        *,
        service: str,
        transient: bool,
        retry_after: float | None = None,
        details: Any = None,
    ):
        self.service = service
        self.transient = transient
        self.retry_after = retry_after
        super().__init__(message, details=details or {"service": service, "transient": transient})


def envelope(*, code: str, message: str, details: Any = None, request_id: str | None) -> dict:
    return {
        "error": {
            "code": code,
            "message": message,
            "details": details if details is not None else {},
            "request_id": request_id,
        }
    }


class DependencyUnavailable(CrucibleError):
    """A part Crucible runs on (Redis: cache, rate-limit counters, task queue) does not answer.
    The request may succeed once it is back: 503 with Retry-After."""

    status_code = 503
    code = "dependency_unavailable"
    default_message = (
        "A service Crucible depends on (Redis: cache, rate limits, task queue) is unavailable; "
        "try again in a few seconds."
    )

    def __init__(
        self,
        message: str | None = None,
        *,
        dependency: str = "redis",
        retry_after: int = 5,
        details: Any = None,
    ):
        self.retry_after = max(1, int(retry_after))
        super().__init__(
            message, details=details or {"dependency": dependency, "retry_after": self.retry_after}
        )


def dependency_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean Redis (the cache, the counters) or the broker is unreachable:
    what the degraded paths catch and the API maps to a 503 ``dependency_unavailable``."""
    found: list[type[BaseException]] = []
    try:
        from redis.exceptions import RedisError

        found.append(RedisError)
    except ImportError:  # pragma: no cover - redis is a dependency
        pass
    try:
        from kombu.exceptions import OperationalError

        found.append(OperationalError)
    except ImportError:  # pragma: no cover - kombu comes with Celery
        pass
    return tuple(found)


_last_warned: dict[str, float] = {}


def warn_degraded(logger: Any, what: str, exc: BaseException, *, interval_s: float = 60.0) -> None:
    """Log "<what> unavailable" at WARNING at most once per ``interval_s`` per ``what`` in this
    process, so an outage under load does not flood the log with one line per request."""
    import time

    now = time.monotonic()
    last = _last_warned.get(what)
    if last is None or now - last >= interval_s:
        _last_warned[what] = now
        logger.warning("%s unavailable, degrading: %s: %s", what, type(exc).__name__, exc)
