from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _ensure_prices(sender=None, **kwargs) -> None:
    """Create the seeded price rows when missing (also after a test database flush)."""
    import importlib

    from django.utils import timezone

    from billing.models import GpuPrice

    seed = importlib.import_module("billing.migrations.0002_seed_gpu_prices")
    for price in seed.PRICES:
        GpuPrice.objects.get_or_create(
            gpu_type=price["gpu_type"], defaults={**price, "updated_at": timezone.now()}
        )


class BillingConfig(AppConfig):
    name = "billing"
    verbose_name = "Billing and budgets"

    def ready(self) -> None:
        post_migrate.connect(_ensure_prices, sender=self, dispatch_uid="billing-prices")
        # Subscribes to training's announcements and registers the cost figures its pages
        # show (training/hooks.py: training never imports billing).
        from billing import hooks

        hooks.connect()
