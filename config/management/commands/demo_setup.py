"""Prepare the demo: a signed-in-able demo user with the admin role and an API token.

Idempotent: running it again keeps the user and token. `make demo` calls it.
"""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from rest_framework.authtoken.models import Token

from config.roles import Role
from config.services import user_create, user_update

DEMO_USERNAME = "demo"
DEMO_PASSWORD = "crucible-demo"  # noqa: S105 - a published demo credential, local only


class Command(BaseCommand):
    help = "Create the demo user (demo / crucible-demo, admin role) and its API token."

    def handle(self, *args, **options):
        user = get_user_model().objects.filter(username=DEMO_USERNAME).first()
        if user is None:
            user = user_create(
                username=DEMO_USERNAME,
                role=Role.ADMIN,
                actor=None,
                email="demo@localhost",
                password=DEMO_PASSWORD,
                first_name="Demo",
                last_name="User",
            )
        else:
            user_update(user=user, role=Role.ADMIN, actor=None)
        token, _ = Token.objects.get_or_create(user=user)
        self.stdout.write(
            self.style.SUCCESS("Demo user ready.")
            + f"\n  Sign in:   {DEMO_USERNAME} / {DEMO_PASSWORD}"
            + f"\n  API token: {token.key}"
            + f"\n  Try:       curl -H 'Authorization: Token {token.key}' "
            "http://127.0.0.1:8000/api/v1/me"
        )
