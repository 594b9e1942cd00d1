"""API authentication (token or browser session) and permission checks."""

from __future__ import annotations

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


_token_auth = ApiTokenAuth()
_session_auth = BrowserSessionAuth()


class CapabilityAuth(APIKeyHeader):
    """Authenticate like the API default, then demand a capability of the caller's role.

    Being an auth callable, it runs before the request body is parsed: a caller without
    the capability gets 403 whatever they sent, and an anonymous one 401.
    """

    param_name = "Authorization"

    def __init__(self, capability: str) -> None:
        self.capability = capability
        super().__init__()

    def __call__(self, request: HttpRequest):
        user = _token_auth(request) or _session_auth(request)
        if not user:
            return None
        if not has_capability(user, self.capability):
            raise PermissionDenied(
                "Your role does not allow this action.",
                details={"required_permission": self.capability},
            )
        return user

    def authenticate(self, request: HttpRequest, key: str | None):  # pragma: no cover
        raise NotImplementedError("CapabilityAuth authenticates in __call__")


def requires(capability: str) -> list[CapabilityAuth]:
    """``auth=`` value for an API operation that needs ``capability`` (see config/roles.py)."""
    return [CapabilityAuth(capability)]
