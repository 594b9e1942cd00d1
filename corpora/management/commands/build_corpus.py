"""Build a JSONL corpus from a folder of text files (see corpora/building.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import orjson
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from corpora.building import ChunkPlan, SourceError, build_record, source_files
from corpora.schemas import corpus_validator
from corpora.tokens import TOKENIZERS, span_function


class Command(BaseCommand):
    help = (
        "Normalise the text files (.txt, .md) under SOURCE, chunk them by tokens with an "
        "overlap, describe them and write a JSONL corpus valid against the current schema. "
        "A NAME.meta.json beside NAME.txt adds fields (title, author, date, document_type, "
        "language, source, metadata, extensions)."
    )

    def add_arguments(self, parser):
        parser.add_argument("source", type=Path, help="Folder of text files (searched deeply)")
        parser.add_argument("output", type=Path, help="The JSONL file to write")
        parser.add_argument("--chunk-tokens", type=int, default=256)
        parser.add_argument("--overlap", type=int, default=32, help="Tokens shared by chunks")
        parser.add_argument("--tokenizer", choices=TOKENIZERS, default="approx")
        parser.add_argument("--normalization", choices=("NFC", "NFKC"), default="NFC")
        parser.add_argument("--document-type", default=None)
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, source: Path, output: Path, **options):
        if not source.is_dir():
            raise CommandError(f"{source} is not a folder")
        try:
            plan = ChunkPlan(options["chunk_tokens"], options["overlap"], options["tokenizer"])
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        files = source_files(source)
        if not files:
            raise CommandError(f"no .txt or .md files under {source}")
        spans = span_function(plan.tokenizer)
        validator = corpus_validator()
        failures, documents, chunks = [], 0, 0
        output.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=output.parent, prefix=".build-", suffix=".jsonl")
        progress = tqdm(
            total=sum(p.stat().st_size for p in files),
            unit="B",
            unit_scale=True,
            desc="build_corpus",
            disable=options["no_progress"],
            file=self.stderr,
        )
        try:
            with os.fdopen(handle, "wb") as out:
                for path in files:
                    try:
                        record = build_record(
                            path,
                            root=source,
                            plan=plan,
                            form=options["normalization"],
                            document_type=options["document_type"],
                            spans=spans,
                        )
                        problem = (
                            validator.explain(record) if not validator.is_valid(record) else None
                        )
                        if problem:
                            raise SourceError(f"{problem[0] or '/'}: {problem[1]}")
                    except SourceError as exc:
                        failures.append(f"{path.relative_to(source)}: {exc}")
                        continue
                    finally:
                        progress.update(path.stat().st_size)
                    out.write(orjson.dumps(record) + b"\n")
                    documents += 1
                    chunks += len(record["chunks"])
            progress.close()
            if failures:
                raise CommandError(
                    f"{len(failures)} file(s) could not be used; nothing written:\n  "
                    + "\n  ".join(failures)
                )
            os.replace(temporary, output)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        self.stdout.write(
            self.style.SUCCESS(f"Wrote {documents} document(s), {chunks} chunk(s) to {output}")
        )
