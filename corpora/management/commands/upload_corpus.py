"""Upload a JSONL corpus from the command line (same validation as the API)."""

from __future__ import annotations

from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from config.errors import CrucibleError
from corpora.models import Corpus
from corpora.schemas import CURRENT_CORPUS_VERSION
from corpora.services import corpus_create, corpus_upload


class Command(BaseCommand):
    help = (
        "Validate and store a JSONL corpus as a new corpus, or append to / replace the "
        "documents of an existing one (--corpus ID --mode append|replace)."
    )

    def add_arguments(self, parser):
        parser.add_argument("file", type=Path)
        parser.add_argument("--name", default="")
        parser.add_argument("--description", default="")
        parser.add_argument("--schema-version", default=CURRENT_CORPUS_VERSION)
        parser.add_argument("--user", default=None, help="Username recorded as the uploader")
        parser.add_argument("--corpus", default=None, help="Existing corpus id")
        parser.add_argument("--mode", choices=("append", "replace"), default="append")

    def handle(self, *args, file: Path, **options):
        if not file.is_file():
            raise CommandError(f"{file} is not a file")
        user = None
        if options["user"]:
            user = get_user_model().objects.filter(username=options["user"]).first()
            if user is None:
                raise CommandError(f"no user named {options['user']}")
        try:
            with file.open("rb") as stream:
                if options["corpus"]:
                    corpus = Corpus.objects.filter(pk=options["corpus"]).first()
                    if corpus is None:
                        raise CommandError(f"no corpus {options['corpus']}")
                    ingestion = corpus_upload(
                        corpus=corpus,
                        upload=stream,
                        user=user,
                        mode=options["mode"],
                        filename=file.name,
                        schema_version=options["schema_version"],
                    )
                else:
                    corpus = corpus_create(
                        name=options["name"] or file.stem,
                        description=options["description"],
                        upload=stream,
                        user=user,
                        filename=file.name,
                        schema_version=options["schema_version"],
                    )
                    ingestion = corpus.ingestions.get()
        except CrucibleError as exc:
            lines = [exc.message]
            for error in (exc.details or {}).get("errors", [])[:20]:
                where = f" {error['pointer']}" if error["pointer"] else ""
                lines.append(f"  line {error['line']}{where}: {error['message']}")
            raise CommandError("\n".join(lines)) from exc
        corpus.refresh_from_db()
        metrics = ingestion.metrics
        self.stdout.write(
            self.style.SUCCESS(
                f"Corpus {corpus.name} ({corpus.pk}): {corpus.record_count} document(s), "
                f"{corpus.chunk_count} chunk(s)"
            )
        )
        self.stdout.write(
            f"  ingested {metrics['records']} record(s), {metrics['bytes']:,} bytes in "
            f"{metrics['seconds']} s ({metrics['records_per_second']:,.0f} records/s)"
        )
        for note in ingestion.notes:
            self.stdout.write(f"  note: {note}")
