"""Login throttling (django-axes) and failed API token lookups counted per address."""

from __future__ import annotations

import random

import pytest
from axes.models import AccessAttempt
from django.core.management import call_command
from django.test import Client

from config.roles import Role
from tests.factories import PASSWORD, TokenFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def limits(settings):
    settings.AXES_FAILURE_LIMIT = 3
    settings.API_TOKEN_FAILURE_RATE = "4/10m"
    settings.RATELIMIT_ENABLE = True
    # Axes' attempts live in the database (rolled back per test); the token-failure counters
    # live in the shared cache (Redis in production mode, never flushed here): each run
    # uses its own addresses.


def _login(client: Client, username: str, password: str, address: str = "10.0.0.1"):
    return client.post("/login/", {"username": username, "password": password}, REMOTE_ADDR=address)


def test_a_user_is_locked_out_after_repeated_failures_with_a_clear_message():
    user = UserFactory(role=Role.ENGINEER)
    client = Client()
    for _ in range(2):
        response = _login(client, user.username, "wrong")
        assert response.status_code == 200 and "Please enter a correct" in response.content.decode()
    locked = _login(client, user.username, "wrong")
    assert locked.status_code == 429
    text = locked.content.decode()
    assert 'id="login-error"' in text and "Too many failed sign-in attempts" in text
    assert "locked for 15 minutes" in text and "axes_reset" in text
    # Even the right password is refused while locked, from another address too (per user).
    again = _login(client, user.username, PASSWORD, address="10.0.0.2")
    assert again.status_code == 429 and "_auth_user_id" not in client.session


def test_an_address_is_locked_out_across_usernames():
    client = Client()
    for name in ("alice", "bob", "carol"):
        _login(client, name, "wrong", address="10.9.9.9")
    user = UserFactory(role=Role.ENGINEER)
    assert _login(client, user.username, PASSWORD, address="10.9.9.9").status_code == 429
    # Another address signs the same user in.
    assert _login(Client(), user.username, PASSWORD, address="10.9.9.10").status_code == 302


def test_admin_unlock_with_axes_reset_and_in_the_admin():
    user = UserFactory(role=Role.ENGINEER)
    for _ in range(3):
        _login(Client(), user.username, "wrong")
    assert _login(Client(), user.username, PASSWORD).status_code == 429
    call_command("axes_reset_username", user.username)
    call_command("axes_reset_ip", "10.0.0.1")
    assert _login(Client(), user.username, PASSWORD).status_code == 302

    # The admin lists the attempts and an admin deletes them (the unlock in the admin).
    for _ in range(3):
        _login(Client(), user.username, "wrong", address="10.0.0.3")
    admin = Client()
    admin.force_login(UserFactory(role=Role.ADMIN, is_superuser=True))
    listing = admin.get("/admin/axes/accessattempt/")
    assert listing.status_code == 200 and user.username in listing.content.decode()
    attempt = AccessAttempt.objects.get(username=user.username)
    response = admin.post(
        f"/admin/axes/accessattempt/{attempt.pk}/delete/", {"post": "yes"}, follow=True
    )
    assert response.status_code == 200
    assert not AccessAttempt.objects.filter(username=user.username).exists()
    assert _login(Client(), user.username, PASSWORD, address="10.0.0.3").status_code == 302


def test_failed_api_tokens_are_counted_per_address_then_429_in_the_envelope():
    client = Client()
    net = f"10.{random.randint(2, 250)}.{random.randint(0, 250)}"
    for _ in range(4):
        response = client.get(
            "/api/v1/training/jobs", headers={"Authorization": "Token nope"}, REMOTE_ADDR=f"{net}.1"
        )
        assert response.status_code == 401
    good = TokenFactory(user=UserFactory(role=Role.ENGINEER))
    blocked = client.get(
        "/api/v1/training/jobs",
        headers={"Authorization": f"Token {good.key}"},
        REMOTE_ADDR=f"{net}.1",
    )
    assert blocked.status_code == 429
    error = blocked.json()["error"]
    assert error["code"] == "rate_limited"
    assert "Too many failed API token attempts from this address" in error["message"]
    assert int(blocked["Retry-After"]) >= 1 and error["details"]["limit"] == 4
    # Other addresses are not affected.
    ok = client.get(
        "/api/v1/training/jobs",
        headers={"Authorization": f"Token {good.key}"},
        REMOTE_ADDR=f"{net}.2",
    )
    assert ok.status_code == 200
