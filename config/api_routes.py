"""Core API routes: who am I, users and roles, tokens, system status."""

import re
from datetime import UTC, datetime
from typing import Annotated

from django.contrib.auth import get_user_model
from django.http import HttpRequest
from ninja import Field, Router, Schema
from ninja.pagination import PageNumberPagination as NinjaPageNumberPagination
from ninja.pagination import paginate
from ninja.responses import Status
from pydantic import AfterValidator, BeforeValidator

from config import health, services
from config.auth import has_capability, requires
from config.errors import NotFound
from config.models import Capability
from config.roles import Role, role_of

router = Router(tags=["core"])
User = get_user_model()

USERNAME_PATTERN = r"^[A-Za-z0-9@.+_-]{1,150}$"
EMAIL_PATTERN = r"^$|^[^@\s]+@[^@\s]+\.[^@\s]+$"


class ErrorDetail(Schema):
    code: str
    message: str
    details: dict | list
    request_id: str | None


class ErrorOut(Schema):
    error: ErrorDetail


class MeOut(Schema):
    id: int
    username: str
    email: str
    full_name: str
    role: Role | None
    capabilities: list[str]


class UserOut(Schema):
    id: int
    username: str
    email: str
    first_name: str
    last_name: str
    role: Role | None
    is_active: bool
    date_joined: datetime
    last_login: datetime | None

    @staticmethod
    def resolve_role(obj) -> Role | None:
        return role_of(obj)


class UserIn(Schema):
    username: str = Field(..., pattern=USERNAME_PATTERN)
    role: Role
    email: str = Field("", pattern=EMAIL_PATTERN, max_length=254)
    first_name: str = Field("", max_length=150)
    last_name: str = Field("", max_length=150)
    password: str | None = Field(None, min_length=1, description="Omit for a token-only account.")


class UserPatch(Schema):
    role: Role | None = None
    is_active: bool | None = None
    email: str | None = Field(None, pattern=EMAIL_PATTERN, max_length=254)


class TokenOut(Schema):
    key: str
    created: datetime
    username: str


class CheckOut(Schema):
    status: str
    latency_ms: float | None = None
    detail: str = ""


class ReadinessOut(Schema):
    status: str
    degraded: list[str]
    checks: dict[str, CheckOut]
    components: dict[str, dict] = Field(
        default_factory=dict, description="Parts apps report, e.g. model_gateway's breakers"
    )


MAX_PAGE = 1_000_000
_NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


def _iso_only(value):
    # pydantic reads a bare number as a Unix time; the schema says ISO 8601 date-time.
    if isinstance(value, int | float) or (isinstance(value, str) and _NUMBER.match(value)):
        raise ValueError("must be an ISO 8601 date-time such as 2026-11-30T12:00:00Z")
    return value


def _as_utc(value: datetime) -> datetime:
    # Any offset ISO 8601 allows (up to +-23:59) is fine here, but PostgreSQL stores only
    # +-15:59 (a 500 once: created_before=0492-09-16T12:50:59+17:11): compare in UTC. A naive
    # value is read as UTC.
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError("is out of the supported date range") from exc


IsoDatetime = Annotated[datetime, BeforeValidator(_iso_only), AfterValidator(_as_utc)]


def _no_default(schema: dict) -> None:
    schema.pop("default", None)


def Omittable(**constraints):
    """An optional field that may be left out but not sent as null: for PATCH bodies, where
    null would otherwise reach a NOT NULL column (a 500). Declare it ``name: str = Omittable()``;
    the schema then says "string, not required" and null is refused with 422."""
    return Field(None, json_schema_extra=_no_default, **constraints)


class PageNumberPagination(NinjaPageNumberPagination):
    """Page-number pagination with the page bounded in the schema: an unbounded page made the
    offset overflow the database's integer (a 500 on ``?page=99999999999999999999``)."""

    class Input(Schema):
        page: int = Field(1, ge=1, le=MAX_PAGE)
        page_size: int | None = Field(None, ge=1)


ERRORS = {401: ErrorOut, 403: ErrorOut, 404: ErrorOut, 409: ErrorOut, 422: ErrorOut, 429: ErrorOut}


def _get_user(user_id: int):
    user = User.objects.prefetch_related("groups").filter(pk=user_id).first()
    if user is None:
        raise NotFound(f"No user with id {user_id}.", details={"id": user_id})
    return user


@router.get("/me", response={200: MeOut, **ERRORS}, summary="The signed-in user and role")
def me(request: HttpRequest):
    user = request.auth
    role = role_of(user)
    return {
        "id": user.pk,
        "username": user.get_username(),
        "email": user.email,
        "full_name": user.get_full_name(),
        "role": role,
        "capabilities": [
            codename
            for codename, _ in Capability._meta.permissions
            if has_capability(user, codename)
        ],
    }


@router.get(
    "/system/status",
    response={200: ReadinessOut, **ERRORS},
    summary="Readiness checks",
    auth=requires("view_dashboard"),
)
def system_status(request: HttpRequest):
    return health.readiness()


@router.get(
    "/users",
    response={200: list[UserOut], **ERRORS},
    summary="List users",
    auth=requires("manage_users"),
)
@paginate(PageNumberPagination)
def users_list(request: HttpRequest):
    return User.objects.prefetch_related("groups").order_by("username")


@router.post(
    "/users",
    response={201: UserOut, **ERRORS},
    summary="Create a user with a role",
    auth=requires("manage_users"),
)
def users_create(request: HttpRequest, payload: UserIn):
    user = services.user_create(actor=request.auth, **payload.dict())
    return Status(201, user)


@router.get(
    "/users/{user_id}",
    response={200: UserOut, **ERRORS},
    summary="One user",
    auth=requires("manage_users"),
)
def users_get(request: HttpRequest, user_id: int):
    return _get_user(user_id)


@router.patch(
    "/users/{user_id}",
    response={200: UserOut, **ERRORS},
    summary="Change role or state",
    auth=requires("manage_users"),
)
def users_update(request: HttpRequest, user_id: int, payload: UserPatch):
    user = _get_user(user_id)
    return services.user_update(user=user, actor=request.auth, **payload.dict(exclude_unset=True))


@router.post(
    "/users/{user_id}/token",
    response={201: TokenOut, **ERRORS},
    summary="Issue a new API token",
    auth=requires("manage_users"),
)
def users_token_rotate(request: HttpRequest, user_id: int):
    user = _get_user(user_id)
    token = services.user_token_rotate(user=user, actor=request.auth)
    return Status(
        201, {"key": token.key, "created": token.created, "username": user.get_username()}
    )
