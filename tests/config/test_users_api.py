"""Users, roles and tokens through the API (admin only)."""

from django.contrib.auth import get_user_model
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from rest_framework.authtoken.models import Token

from config.roles import Role, role_of
from tests.conftest import assert_envelope
from tests.factories import UserFactory

User = get_user_model()


def test_admin_creates_a_user_with_a_role(admin_api):
    response = admin_api.post(
        "users",
        json={"username": "grace", "role": "analyst", "email": "grace@example.com"},
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["role"] == "analyst" and body["is_active"] is True
    user = User.objects.get(username="grace")
    assert role_of(user) is Role.ANALYST
    assert not user.has_usable_password()  # token-only account
    assert user.has_perm("core.approve_validations") and not user.has_perm("core.run_jobs")


def test_weak_password_is_refused_with_reasons_and_writes_nothing(admin_api):
    response = admin_api.post(
        "users", json={"username": "weak", "role": "viewer", "password": "123"}
    )
    error = assert_envelope(response, 422, "validation_error")
    assert error["details"]["password"]
    assert not User.objects.filter(username="weak").exists()


def _queries_for_users_page(client) -> int:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get("users?page=1")
    assert response.status_code == 200
    return len(ctx.captured_queries)


@override_settings(RATELIMIT_ENABLE=False)  # the DB cache's counter queries vary by call
def test_users_list_is_paginated_without_n_plus_one(admin_api):
    UserFactory.create_batch(2, role=Role.VIEWER)
    few = _queries_for_users_page(admin_api)
    for role in Role:
        UserFactory.create_batch(10, role=role)
    assert _queries_for_users_page(admin_api) == few
    body = admin_api.get("users?page=1").json()
    assert body["count"] == 43
    assert len(body["items"]) == 43
    assert {item["role"] for item in body["items"]} == {r.value for r in Role}


def test_role_change_takes_effect(admin_api):
    user = UserFactory(role=Role.VIEWER)
    response = admin_api.patch(f"users/{user.pk}", json={"role": "engineer"})
    assert response.status_code == 200 and response.json()["role"] == "engineer"
    user = User.objects.get(pk=user.pk)
    assert user.has_perm("core.run_jobs")
    assert list(user.groups.values_list("name", flat=True)) == ["engineer"]


def test_the_last_admin_cannot_be_demoted_or_deactivated(admin_api):
    me = admin_api.user
    assert_envelope(admin_api.patch(f"users/{me.pk}", json={"role": "viewer"}), 409, "conflict")
    assert_envelope(admin_api.patch(f"users/{me.pk}", json={"is_active": False}), 409)
    assert role_of(User.objects.get(pk=me.pk)) is Role.ADMIN


def test_token_rotation_invalidates_the_old_key(admin_api, api_as):
    target = api_as(Role.ENGINEER)
    old_key = target.token.key
    response = admin_api.post(f"users/{target.user.pk}/token")
    assert response.status_code == 201
    new_key = response.json()["key"]
    assert new_key != old_key
    assert_envelope(target.get("me"), 401)
    assert Token.objects.get(user=target.user).key == new_key


def test_me_lists_the_callers_capabilities(api_as):
    caps = {
        role: set(api_as(role).get("me").json()["capabilities"])
        for role in (Role.VIEWER, Role.ANALYST, Role.ENGINEER, Role.ADMIN)
    }
    assert caps[Role.VIEWER] == {"view_dashboard"}
    assert caps[Role.ANALYST] == {"view_dashboard", "score_validations", "approve_validations"}
    assert caps[Role.ENGINEER] == {"view_dashboard", "run_jobs"}
    assert {"manage_budgets", "override_budgets", "manage_users"} <= caps[Role.ADMIN]


def test_non_admin_roles_cannot_read_users(api_as):
    for role in (Role.VIEWER, Role.ANALYST, Role.ENGINEER):
        assert_envelope(api_as(role).get("users"), 403, "permission_denied")
