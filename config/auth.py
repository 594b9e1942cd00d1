"""API authentication (token or browser session) and permission checks."""

from __future__ import annotations

import functools
from collections.abc import Callable

from django.http import HttpRequest
from ninja.security import APIKeyHeader, SessionAuth
from rest_framework.authtoken.models import Token

from config.errors import PermissionDenied

TOKEN_SCHEMES = ("token", "bearer")


class ApiTokenAuth(APIKeyHeader):
    """``Authorization: Token <key>`` or ``Authorization: Bearer <key>``.

    Keys are rest_framework.authtoken tokens: created in the admin, by
    ``manage.py drf_create_token <username>`` or by ``POST /api/v1/users/{id}/token``.
    """

    param_name = "Authorization"

    def authenticate(self, request: HttpRequest, key: str | None):
        scheme, _, value = (key or "").strip().partition(" ")
        value = value.strip()
        if scheme.lower() not in TOKEN_SCHEMES or not value:
            return None
        token = Token.objects.select_related("user").filter(key=value).first()
        if token is None or not token.user.is_active:
            return None
        request.user = token.user
        request.api_token = token
        return token.user


class BrowserSessionAuth(SessionAuth):
    """The dashboard's session, for htmx calls into the API.

    CSRF is checked only once a signed-in session is found, so that an anonymous
    request is answered 401 (not a CSRF 403).
    """

    def _get_key(self, request: HttpRequest):
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return None
        return super()._get_key(request)


def has_capability(user, capability: str) -> bool:
    return bool(user and user.is_authenticated and user.has_perm(f"core.{capability}"))


def requires(capability: str) -> Callable:
    """Decorator for API operations: 403 unless the caller's role grants ``capability``."""

    def decorator(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapper(request: HttpRequest, *args, **kwargs):
            if not has_capability(request.auth, capability):
                raise PermissionDenied(
                    "Your role does not allow this action.",
                    details={"required_permission": capability},
                )
            return view(request, *args, **kwargs)

        return wrapper

    return decorator
