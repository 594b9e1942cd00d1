"""Roles are Django groups; what each may do is a set of permissions, synced on migrate.

viewer reads; analyst also scores and approves validations; engineer also uploads data
and creates and runs jobs; admin does everything, including budgets, users and overrides.
"""

from __future__ import annotations

from enum import StrEnum

from django.contrib.auth.models import Group, Permission

CRUCIBLE_APPS = ("core", "corpora", "jobs", "training", "evaluation", "billing")


class Role(StrEnum):
    ADMIN = "admin"
    ENGINEER = "engineer"
    ANALYST = "analyst"
    VIEWER = "viewer"

    @property
    def label(self) -> str:
        return self.value.capitalize()


# Highest first: a user in several groups is shown with the highest.
ROLE_ORDER = (Role.ADMIN, Role.ENGINEER, Role.ANALYST, Role.VIEWER)

_READ = ["core.view_dashboard"]
ROLE_CAPABILITIES: dict[Role, list[str]] = {
    Role.VIEWER: _READ,
    Role.ANALYST: [*_READ, "core.score_validations", "core.approve_validations"],
    Role.ENGINEER: [*_READ, "core.run_jobs"],
    Role.ADMIN: [
        *_READ,
        "core.run_jobs",
        "core.score_validations",
        "core.approve_validations",
        "core.manage_budgets",
        "core.override_budgets",
        "core.manage_users",
    ],
}


def _permissions_for(role: Role) -> list[Permission]:
    perms = Permission.objects.select_related("content_type")
    app_perms = perms.filter(content_type__app_label__in=CRUCIBLE_APPS)
    wanted = {tuple(p.split(".", 1)) for p in ROLE_CAPABILITIES[role]}
    chosen = [p for p in app_perms if (p.content_type.app_label, p.codename) in wanted]
    # Every role reads every Crucible model (and the admin shows them read-only).
    chosen += [p for p in app_perms if p.codename.startswith("view_")]
    if role is Role.ADMIN:
        chosen += list(app_perms)
        chosen += list(perms.filter(content_type__app_label__in=("auth", "authtoken")))
    return list({p.pk: p for p in chosen}.values())


def sync_roles() -> None:
    """Create the four groups and set their permissions to exactly the role's set."""
    for role in ROLE_ORDER:
        group, _ = Group.objects.get_or_create(name=role.value)
        group.permissions.set(_permissions_for(role))


def sync_roles_after_migrate(sender, using=None, **kwargs) -> None:
    # post_migrate is sent once per app, after that app's permissions exist; syncing on
    # each Crucible app means the last one leaves every group complete.
    if sender.label in CRUCIBLE_APPS:
        sync_roles()


def role_of(user) -> Role | None:
    if not user.is_authenticated:
        return None
    if user.is_superuser:
        return Role.ADMIN
    names = {g.name for g in user.groups.all()}
    return next((r for r in ROLE_ORDER if r.value in names), None)


# --- Object-level permissions: the one rule -------------------------------------------------
# Reading is shared. Changing (edit, start, cancel, retry, delete, append) is for the user who
# created the object and for admins. Objects the system made (no creator: seeds, `manage.py
# train`, tests' fixtures) may be changed by anyone whose role allows the action.

OWNER_FIELDS = ("created_by_id", "uploaded_by_id")


def owner_id(obj) -> int | None:
    for field in OWNER_FIELDS:
        if hasattr(obj, field):
            return getattr(obj, field)
    return None


def can_change(user, obj) -> bool:
    if user is None or not user.is_authenticated:
        return False
    if role_of(user) is Role.ADMIN:
        return True
    owner = owner_id(obj)
    return owner is None or owner == user.pk


def require_change(user, obj, what: str = "this") -> None:
    """Raise PermissionDenied (403 in the API's envelope; the pages show their 403) unless
    ``user`` may change ``obj``."""
    if not can_change(user, obj):
        from config.errors import PermissionDenied

        raise PermissionDenied(
            f"Only the user who created {what} or an admin can change it.",
            details={"owner_id": owner_id(obj)},
        )
