"""``manage.py gateway_models_refresh [--provider SLUG]``: list each enabled provider's models
(``GET /v1/models``) into the gateway's registry, with prices and context lengths."""

from django.core.management.base import BaseCommand, CommandError

from jobs import services
from jobs.models import Provider


class Command(BaseCommand):
    help = "Refresh the model registry from every enabled provider's /v1/models."

    def add_arguments(self, parser):
        parser.add_argument("--provider", help="Only this provider (its slug)")

    def handle(self, *args, provider=None, **options):
        chosen = None
        if provider:
            chosen = Provider.objects.filter(slug=provider).first()
            if chosen is None:
                known = ", ".join(Provider.objects.values_list("slug", flat=True)) or "none"
                raise CommandError(f"No provider {provider!r} (known: {known}).")
        reports = services.registry_refresh(provider=chosen)
        failed = 0
        for report in reports:
            if report.error:
                failed += 1
                self.stderr.write(f"{report.provider}: failed: {report.error}")
                continue
            self.stdout.write(
                f"{report.provider}: {len(report.added)} added, {len(report.updated)} updated, "
                f"{len(report.vanished)} no longer listed, {len(report.unpriced)} without a price"
            )
            for key in report.added:
                self.stdout.write(f"  + {key}")
            for key in report.vanished:
                self.stdout.write(f"  - {key} (kept, marked as no longer listed)")
        if failed and failed == len(reports):
            raise CommandError("No provider could be refreshed.")
