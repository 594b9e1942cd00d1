"""Management commands: drf_create_token, crucible_user, demo_setup."""

from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from rest_framework.authtoken.models import Token

from config.roles import Role, role_of
from tests.conftest import ApiClient
from tests.factories import UserFactory


@pytest.mark.django_db
def test_drf_create_token_makes_a_working_api_token():
    user = UserFactory(role=Role.ANALYST)
    out = StringIO()
    call_command("drf_create_token", user.username, stdout=out)
    token = Token.objects.get(user=user)
    assert token.key in out.getvalue()
    for scheme in ("Token", "Bearer"):
        assert ApiClient(token, scheme=scheme).get("me").json()["role"] == "analyst"


@pytest.mark.django_db
def test_crucible_user_creates_and_updates_roles():
    out = StringIO()
    call_command("crucible_user", "alan", "--role", "engineer", "--token", stdout=out)
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.get(username="alan")
    assert role_of(user) is Role.ENGINEER
    assert Token.objects.get(user=user).key in out.getvalue()
    call_command("crucible_user", "alan", "--role", "viewer", stdout=StringIO())
    assert role_of(get_user_model().objects.get(username="alan")) is Role.VIEWER


@pytest.mark.django_db
def test_crucible_user_reports_bad_input():
    with pytest.raises(CommandError, match="too weak"):
        call_command(
            "crucible_user", "bob", "--role", "viewer", "--password", "1", stdout=StringIO()
        )


@pytest.mark.django_db
def test_demo_setup_is_idempotent_and_the_demo_user_can_sign_in():
    from django.test import Client

    call_command("demo_setup", "--force", stdout=StringIO())
    first = Token.objects.get(user__username="demo").key
    call_command("demo_setup", "--force", stdout=StringIO())
    assert Token.objects.get(user__username="demo").key == first
    client = Client()
    assert client.login(username="demo", password="crucible-demo")
    assert client.get("/").status_code == 200


def test_demo_setup_refuses_the_published_admin_on_a_non_sqlite_database(settings, db):
    from django.contrib.auth import get_user_model
    from django.core.management.base import CommandError

    settings.DATABASES = {
        **settings.DATABASES,
        "default": {**settings.DATABASES["default"], "ENGINE": "django.db.backends.postgresql"},
    }
    with pytest.raises(CommandError, match="Refusing to create the demo admin 'demo'") as caught:
        call_command("demo_setup", stdout=StringIO())
    assert "postgresql" in str(caught.value) and "--force" in str(caught.value)
    assert not get_user_model().objects.filter(username="demo").exists()
