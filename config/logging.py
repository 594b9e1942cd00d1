"""Structured logging: request context on every line, JSON in production, secrets redacted.

The request ID and user live in context variables, so they follow the request through
threads started with ``contextvars.copy_context`` and into Celery tasks (see celery.py).
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
_user: ContextVar[str | None] = ContextVar("user", default=None)


def bind_context(*, request_id: str | None, user: str | None = None) -> None:
    _request_id.set(request_id)
    _user.set(user)


def bind_user(user: str | None) -> None:
    _user.set(user)


def clear_context() -> None:
    _request_id.set(None)
    _user.set(None)


def current_request_id() -> str | None:
    return _request_id.get()


class RequestContextFilter(logging.Filter):
    """Adds ``request_id`` and ``user`` to every record (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = _request_id.get() or "-"
        if not getattr(record, "user", None):
            record.user = _user.get() or "-"
        return True


# Authorization header values and key=value pairs whose name says secret.
_SECRET_PATTERNS = [
    re.compile(r"(?i)\b(token|bearer)\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(
        r"(?i)\b([a-z_]*(?:secret|password|passwd|api_key|apikey|access_key|token)[a-z_]*)"
        r"(\s*[=:]\s*)(['\"]?)[^\s'\",;&]+"
    ),
    re.compile(r"(?i)(://[^:/@\s]*:)[^@/\s]+@"),
]


def redact(text: str) -> str:
    text = _SECRET_PATTERNS[0].sub(lambda m: f"{m.group(1)} [REDACTED]", text)
    text = _SECRET_PATTERNS[1].sub(
        lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}[REDACTED]", text
    )
    return _SECRET_PATTERNS[2].sub(lambda m: f"{m.group(1)}[REDACTED]@", text)


def _configured_secrets() -> list[str]:
    try:
        from django.conf import settings

        names = (
            "SECRET_KEY",
            "RUNPOD_API_KEY",
            "HF_TOKEN",
            "EMAIL_HOST_PASSWORD",
            "SLACK_WEBHOOK_URL",
        )
        values = [getattr(settings, n, "") for n in names]
        s3 = settings.STORAGES["default"].get("OPTIONS", {}).get("secret_key")
        values.append(s3 or "")
        return [v for v in values if isinstance(v, str) and len(v) >= 8]
    except Exception:  # settings not ready (very early start-up)
        return []


class RedactSecretsFilter(logging.Filter):
    """Never let a credential reach a log line, whatever the code logged.

    Formats the message once, replaces configured secret values and credential-looking
    patterns, and freezes the result so handlers print the redacted text.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for secret in _configured_secrets():
            message = message.replace(secret, "[REDACTED]")
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class JsonFormatter(_JsonFormatter):
    """One JSON object a line, always with request_id and user."""

    def add_fields(self, log_record, record, message_dict):
        super().add_fields(log_record, record, message_dict)
        log_record.setdefault("request_id", getattr(record, "request_id", "-"))
        log_record.setdefault("user", getattr(record, "user", "-"))
