"""API authentication (token or browser session) and permission checks."""

from __future__ import annotations

from axes.backends import AxesStandaloneBackend
from django.http import HttpRequest
from ninja.security import APIKeyHeader, SessionAuth
from rest_framework.authtoken.models import Token

from config.errors import PermissionDenied, RateLimited

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
        refuse_if_token_guessing(request)
        token = Token.objects.select_related("user").filter(key=value).first()
        if token is None or not token.user.is_active:
            count_token_failure(request)
            return None
        request.user = token.user
        request.api_token = token
        return token.user


# --- Failed token lookups, counted per address -------------------------------------------------
# django-axes counts failed *logins* (username + password through django.contrib.auth); a token
# lookup is not an authentication attempt it sees, and its database handler would write a row
# per bad token. So failed lookups are counted on the shared cache with django-ratelimit (already
# the API's rate limiter): API_TOKEN_FAILURE_RATE per address, then 429 for every token from that
# address until the window passes.

TOKEN_FAILURE_GROUP = "api-token-failures"  # noqa: S105 - a cache key group, not a secret


def _token_failures(request: HttpRequest, *, increment: bool) -> dict | None:
    from django.conf import settings

    from config.ratelimit import usage_or_none  # fails open while the cache (Redis) is down

    return usage_or_none(
        request,
        group=TOKEN_FAILURE_GROUP,
        key="ip",
        rate=settings.API_TOKEN_FAILURE_RATE,
        increment=increment,
    )


def refuse_if_token_guessing(request: HttpRequest) -> None:
    usage = _token_failures(request, increment=False)
    if usage and usage["count"] >= usage["limit"]:
        raise RateLimited(
            f"Too many failed API token attempts from this address ({usage['limit']}); "
            f"try again in {max(1, usage['time_left'])} s.",
            retry_after=usage["time_left"],
            details={"limit": usage["limit"], "retry_after": max(1, usage["time_left"])},
        )


def count_token_failure(request: HttpRequest) -> None:
    if getattr(request, "_token_failure_counted", False):
        return  # several auth classes may look at the same request
    request._token_failure_counted = True
    _token_failures(request, increment=True)


class LoginThrottleBackend(AxesStandaloneBackend):
    """django-axes' lockout check for logins that come with a request (the login page, the
    admin). Calls without one (``Client.login`` in tests, scripts) are left to ModelBackend:
    there is no address to throttle."""

    def authenticate(self, request=None, *args, **kwargs):
        if request is None:
            return None
        return super().authenticate(request, *args, **kwargs)


def lockout_response(request: HttpRequest, response=None, credentials=None, *args, **kwargs):
    """What a locked-out login gets: the login page with the reason, status 429."""
    from django.conf import settings
    from django.contrib.auth.forms import AuthenticationForm
    from django.shortcuts import render

    minutes = int(settings.AXES_COOLOFF_TIME.total_seconds() // 60)
    message = (
        f"Too many failed sign-in attempts: this account or address is locked for {minutes} "
        "minutes. An administrator can unlock it now (Admin > Access attempts, or "
        "manage.py axes_reset)."
    )
    form = AuthenticationForm(request, data=request.POST or None)
    form.errors.clear()
    form.add_error(None, message)
    return render(
        request, "registration/login.html", {"form": form, "locked_out": True}, status=429
    )


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
