"""Upgrade a JSONL corpus file from an older schema version to a newer one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import orjson
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from corpora.schema_migrations import describe_path, upgrader
from corpora.schemas import CORPUS_VERSIONS, CURRENT_CORPUS_VERSION, corpus_validator
from corpora.validation import JsonlReport, iter_jsonl

SHOWN_ERRORS = 20


class Command(BaseCommand):
    help = (
        "Validate every record of INPUT against --from, apply the written migration steps "
        "(corpora/schema_migrations.py) and write records valid against --to. Any invalid "
        "record: errors with line numbers, and nothing is written."
    )

    def add_arguments(self, parser):
        parser.add_argument("input", type=Path)
        parser.add_argument("output", type=Path, nargs="?")
        parser.add_argument("--from", dest="from_version", required=True, choices=CORPUS_VERSIONS)
        parser.add_argument("--to", dest="to_version", default=CURRENT_CORPUS_VERSION)
        parser.add_argument("--check", action="store_true", help="Validate only, write nothing")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, input: Path, output: Path | None, **options):
        source, target = options["from_version"], options["to_version"]
        if target not in CORPUS_VERSIONS:
            raise CommandError(f"unknown target version {target}")
        try:
            upgrade = upgrader(source, target)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        if not input.is_file():
            raise CommandError(f"{input} is not a file")
        if output is None and not options["check"]:
            output = input.with_name(f"{input.stem}.v{target}.jsonl")
        before, after = corpus_validator(source), corpus_validator(target)
        report = JsonlReport()
        records = 0
        folder = (output or input).parent
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".migrate-", suffix=".jsonl")
        try:
            with (
                input.open("rb") as stream,
                os.fdopen(handle, "wb") as out,
                tqdm(
                    total=input.stat().st_size,
                    unit="B",
                    unit_scale=True,
                    desc=f"v{source} → v{target}",
                    disable=options["no_progress"],
                    file=self.stderr,
                ) as progress,
            ):
                position = 0
                for number, record in iter_jsonl(stream, report):
                    progress.update(stream.tell() - position)
                    position = stream.tell()
                    if not isinstance(record, dict) or not before.is_valid(record):
                        pointer, message = (
                            before.explain(record)
                            if isinstance(record, dict)
                            else ("", "each line must be a JSON object")
                        )
                        report.add_error(number, pointer, f"(v{source}) {message}")
                        continue
                    upgraded = upgrade(record) if upgrade else record
                    if not after.is_valid(upgraded):
                        pointer, message = after.explain(upgraded)
                        report.add_error(number, pointer, f"(after upgrade to v{target}) {message}")
                        continue
                    out.write(orjson.dumps(upgraded) + b"\n")
                    records += 1
            if not report.valid:
                shown = "\n".join(
                    f"  line {e['line']} {e['pointer']}: {e['message']}".replace(" :", ":")
                    for e in report.errors[:SHOWN_ERRORS]
                )
                raise CommandError(
                    f"{report.error_total} invalid record(s); nothing written.\n{shown}"
                )
            if not options["check"]:
                os.replace(temporary, output)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        verb = "Checked" if options["check"] else f"Wrote {output}:"
        self.stdout.write(
            self.style.SUCCESS(
                f"{verb} {records} record(s) upgraded {describe_path(source, target)}"
            )
        )
