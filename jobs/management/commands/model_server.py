"""Register the model server (gpu/serve.py, vLLM or any OpenAI-compatible endpoint) as the
gateway's ``crucible-server`` provider and list its models into the registry.

    manage.py model_server [--url http://127.0.0.1:8765/v1] [--wait 180]

``--wait`` polls the server's /health (or /v1/models) until it answers, for a server that is
still loading its model (the demo starts both at once).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

from django.core.management.base import BaseCommand, CommandError

from jobs import serving


class Command(BaseCommand):
    help = "Register the model server as the crucible-server provider and refresh its models."

    def add_arguments(self, parser):
        parser.add_argument("--url", default="", help="base URL ending in /v1 (MODEL_SERVER_URL)")
        parser.add_argument("--wait", type=float, default=0, help="seconds to wait for it")

    def handle(self, *args, url: str, wait: float, **options):
        url = (url or serving.model_server_url()).rstrip("/")
        deadline = time.monotonic() + wait
        while True:
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=5):  # noqa: S310
                    break
            except (urllib.error.URLError, OSError) as exc:
                if time.monotonic() >= deadline:
                    message = f"The model server at {url} does not answer: {exc}"
                    raise CommandError(message) from None
                time.sleep(2)
        provider = serving.model_server_provider_sync(base_url=url)
        keys = sorted(provider.models.filter(enabled=True).values_list("key", flat=True))
        self.stdout.write(f"{provider.slug} at {url}: {', '.join(keys) or 'no models'}")
