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
