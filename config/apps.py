from django.apps import AppConfig
from django.db.models.signals import post_migrate


class CoreConfig(AppConfig):
    """Project-wide pieces that belong to no single app: roles, health, the dashboard shell."""

    name = "config"
    label = "core"
    verbose_name = "Crucible core"

    def ready(self) -> None:
        from config import roles

        # Runs after every `migrate`, so groups pick up permissions of apps added later.
        post_migrate.connect(roles.sync_roles_after_migrate, dispatch_uid="crucible-sync-roles")
