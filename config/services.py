"""User and role workflows (the admin's 'manages users')."""

from __future__ import annotations

import logging

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractUser, Group
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import transaction
from rest_framework.authtoken.models import Token

from config.errors import Conflict, InvalidInput
from config.roles import ROLE_ORDER, Role, role_of

logger = logging.getLogger("crucible.users")
User = get_user_model()


def _set_role(user: AbstractUser, role: Role) -> None:
    user.groups.remove(*Group.objects.filter(name__in=[r.value for r in ROLE_ORDER]))
    user.groups.add(Group.objects.get(name=role.value))
    # Admins use the Django admin; other roles work in the dashboard and the API.
    user.is_staff = role is Role.ADMIN
    user.save(update_fields=["is_staff"])


def _active_admins() -> int:
    return User.objects.filter(is_active=True, groups__name=Role.ADMIN.value).count() + (
        User.objects.filter(is_active=True, is_superuser=True)
        .exclude(groups__name=Role.ADMIN.value)
        .count()
    )


@transaction.atomic
def user_create(
    *,
    username: str,
    role: Role,
    actor: AbstractUser | None,
    email: str = "",
    password: str | None = None,
    first_name: str = "",
    last_name: str = "",
) -> AbstractUser:
    if User.objects.filter(username__iexact=username).exists():
        raise Conflict(f"A user named '{username}' already exists.", details={"username": username})
    user = User(username=username, email=email, first_name=first_name, last_name=last_name)
    if password:
        try:
            validate_password(password, user)
        except ValidationError as exc:
            raise InvalidInput(
                "The password is too weak.", details={"password": list(exc.messages)}
            ) from exc
        user.set_password(password)
    else:
        # API-only account: signs in with a token, never with a password.
        user.set_unusable_password()
    user.save()
    _set_role(user, role)
    logger.info("user %s created with role %s by %s", username, role.value, actor or "system")
    return user


@transaction.atomic
def user_update(
    *,
    user: AbstractUser,
    actor: AbstractUser | None,
    role: Role | None = None,
    is_active: bool | None = None,
    email: str | None = None,
) -> AbstractUser:
    demoting = role is not None and role is not Role.ADMIN and role_of(user) is Role.ADMIN
    deactivating = is_active is False and user.is_active and role_of(user) is Role.ADMIN
    if (demoting or deactivating) and _active_admins() <= 1:
        raise Conflict("Crucible needs at least one active admin; promote another user first.")
    if role is not None:
        _set_role(user, role)
    if is_active is not None:
        user.is_active = is_active
    if email is not None:
        user.email = email
    user.save()
    logger.info("user %s updated by %s", user.get_username(), actor or "system")
    return user


@transaction.atomic
def user_token_rotate(*, user: AbstractUser, actor: AbstractUser | None) -> Token:
    """Issue a new API token for ``user``; the previous one stops working at once."""
    Token.objects.filter(user=user).delete()
    token = Token.objects.create(user=user)
    logger.info("API token rotated for %s by %s", user.get_username(), actor or "system")
    return token
