"""Create a user with a role (or change an existing user's role), optionally with a token.

manage.py crucible_user ada --role engineer --email ada@example.com --password ... --token
"""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from config.errors import CrucibleError
from config.roles import Role
from config.services import user_create, user_token_rotate, user_update


class Command(BaseCommand):
    help = "Create a Crucible user with a role, or change an existing user's role."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--role", required=True, choices=[r.value for r in Role])
        parser.add_argument("--email", default="")
        parser.add_argument("--password", default=None, help="Omit for a token-only account.")
        parser.add_argument("--token", action="store_true", help="Issue a new API token.")

    def handle(self, *args, username, role, email, password, token, **options):
        user_model = get_user_model()
        try:
            user = user_model.objects.filter(username=username).first()
            if user is None:
                user = user_create(
                    username=username, role=Role(role), email=email, password=password, actor=None
                )
                self.stdout.write(f"Created {username} ({role}).")
            else:
                user_update(user=user, role=Role(role), actor=None)
                if password:
                    user.set_password(password)
                    user.save(update_fields=["password"])
                self.stdout.write(f"Updated {username} ({role}).")
            if token:
                self.stdout.write(f"API token: {user_token_rotate(user=user, actor=None).key}")
        except CrucibleError as exc:
            raise CommandError(exc.message) from exc
