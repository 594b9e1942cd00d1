"""Per-token API rate limits on a shared counter.

django-ratelimit keeps a fixed-window counter in the default cache (``cache.add`` then
``cache.incr``): Redis in production, the database cache in the embedded mode, so every
web process counts against the same number. The limit is ``API_RATE_LIMIT`` ("600/m").

When the cache does not answer (Redis down) the limits fail open: the request goes ahead
unlimited (a warning is logged once a minute) rather than every API call failing with the
counter's outage. ``RATELIMIT_FAIL_OPEN`` (config/settings.py) covers a counter that could not be
read; ``usage_or_none()`` covers the connection errors django-ratelimit lets through.
"""

from __future__ import annotations

import hashlib
import logging
import threading

from django.conf import settings
from django.http import HttpRequest
from django_ratelimit.core import get_usage
from ninja.throttling import BaseThrottle

from config.errors import dependency_errors, warn_degraded

logger = logging.getLogger("crucible.ratelimit")


def usage_or_none(request: HttpRequest, **kwargs) -> dict | None:
    """django-ratelimit's ``get_usage``, failing open (None: not limited) when the cache that
    holds the counters is unreachable. django-ratelimit itself only catches DNS errors there."""
    try:
        return get_usage(request, **kwargs)
    except dependency_errors() as exc:
        warn_degraded(logger, "API rate-limit counter (cache)", exc)
        return None


def _client_key(_group: str, request: HttpRequest) -> str:
    token = getattr(request, "api_token", None)
    if token is not None:
        return "token:" + hashlib.sha256(token.key.encode()).hexdigest()[:32]
    user = getattr(request, "auth", None) or getattr(request, "user", None)
    if user is not None and getattr(user, "is_authenticated", False):
        return f"user:{user.pk}"
    return "ip:" + (request.META.get("REMOTE_ADDR") or "unknown")


class TokenRateThrottle(BaseThrottle):
    def __init__(self) -> None:
        # ninja asks wait() right after allow_request(), on the same thread.
        self._local = threading.local()

    def allow_request(self, request: HttpRequest) -> bool:
        usage = usage_or_none(
            request,
            group="api",
            key=_client_key,
            rate=settings.API_RATE_LIMIT,
            method=get_usage.ALL,
            increment=True,
        )
        if usage is None or not usage["should_limit"]:
            return True
        request.rate_limit = usage
        self._local.wait = max(1, usage["time_left"])
        return False

    def wait(self) -> float | None:
        return getattr(self._local, "wait", None)
