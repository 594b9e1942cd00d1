"""Prepare the demo: a signed-in-able demo user with the admin role and an API token, and the
sample corpus (samples/corpus/speeches.jsonl) so the Datasets page has something in it.

Idempotent: running it again keeps the user, the token and the corpus. `make demo` calls it.
"""

import os
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from rest_framework.authtoken.models import Token

from config.addresses import public_base_url
from config.roles import Role
from config.services import user_create, user_update

DEMO_USERNAME = "demo"
DEMO_PASSWORD = "crucible-demo"  # noqa: S105 - a published demo credential, local only
SAMPLE_CORPUS = "samples/corpus/speeches.jsonl"
SAMPLE_CORPUS_NAME = "Sample: speeches and declarations"


def sample_corpus_ensure(*, user) -> tuple[object, bool]:
    """The demo's sample corpus, uploaded through the corpus service once; (corpus, created)."""
    # The demo commands are the one place that wires the apps together; import lazily so
    # config's modules import no app at import time.
    from corpora.models import Corpus
    from corpora.services import corpus_create

    existing = Corpus.objects.filter(name=SAMPLE_CORPUS_NAME).first()
    if existing is not None:
        return existing, False
    path = Path(settings.BASE_DIR) / SAMPLE_CORPUS
    with path.open("rb") as upload:
        corpus = corpus_create(
            name=SAMPLE_CORPUS_NAME,
            upload=upload,
            user=user,
            filename=path.name,
            description="Four public-domain texts (speeches and a declaration), loaded by "
            "the demo from samples/corpus/.",
        )
    return corpus, True


class Command(BaseCommand):
    help = (
        "Create the demo user (demo / crucible-demo, admin role), its API token and the "
        "sample corpus."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--url",
            default=None,
            help="The address the dashboard is served on (default: CRUCIBLE_PUBLIC_URL)",
        )
        parser.add_argument(
            "--force",
            action="store_true",
            help="Create the demo admin (published password) on a non-SQLite database too",
        )

    def handle(self, *args, url=None, **options):
        engine = settings.DATABASES["default"]["ENGINE"]
        if "sqlite" not in engine and not options.get("force"):
            raise CommandError(
                f"Refusing to create the demo admin '{DEMO_USERNAME}' with its published "
                f"password on this database ({engine.rsplit('.', 1)[-1]}, from DATABASE_URL): "
                "anyone who reads the README could sign in. Use the embedded SQLite demo, or "
                "pass --force on a throwaway database."
            )
        # The same base address as every other link the product prints (config/addresses.py).
        url = (url or os.environ.get("CRUCIBLE_PUBLIC_URL") or public_base_url()).rstrip("/")
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
        corpus, created = sample_corpus_ensure(user=user)
        self.stdout.write(
            self.style.SUCCESS("Demo user ready.")
            + f"\n  Sign in:   {DEMO_USERNAME} / {DEMO_PASSWORD}  at {url}/"
            + f"\n  API token: {token.key}"
            + f"\n  Try:       curl -H 'Authorization: Token {token.key}' {url}/api/v1/me"
            + f"\n  Corpus:    “{corpus.name}” ({corpus.record_count} documents"
            + (", loaded now)" if created else ", already loaded)")
        )
