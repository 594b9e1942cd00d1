"""Corpus, training-file and export workflows.

Uploads are validated in full before anything is kept: the documents of a corpus are
written inside one transaction as they stream in, and the transaction is rolled back
(and the stored file removed) if any line fails, so an invalid file leaves nothing.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import PurePath
from typing import IO

from django.contrib.auth.models import AbstractUser
from django.db import transaction
from django.utils import timezone

from config.errors import Conflict, InvalidInput
from config.storage import storage_delete, storage_save
from corpora import exports
from corpora.ingest import DocumentWriter, StreamSummary, corpus_checksum, corpus_statistics
from corpora.models import Chunk, Corpus, CorpusIngestion, Document, Export, TrainingFile
from corpora.schema_migrations import describe_path
from corpora.schemas import CURRENT_CORPUS_VERSION, check_corpus_version
from corpora.validation import JsonlReport, iter_corpus_records, validate_training_file

logger = logging.getLogger("crucible.corpora")


def _safe_filename(filename: str, default: str) -> str:
    name = PurePath(filename or "").name.replace("\x00", "")
    return name[:200] or default


def _version(schema_version: str) -> str:
    try:
        return check_corpus_version(schema_version)
    except ValueError as exc:
        raise InvalidInput(
            f"The schema version is not valid: {exc}.",
            details={"fields": [{"field": "schema_version", "message": str(exc)}]},
        ) from exc


def _ingest(
    *,
    corpus: Corpus,
    upload: IO[bytes],
    user: AbstractUser | None,
    filename: str,
    schema_version: str,
    mode: str,
    stored: list[str],
) -> CorpusIngestion:
    """Stream ``upload`` into ``corpus``; call inside ``transaction.atomic``.

    The path of the stored copy is appended to ``stored`` for the caller to remove if
    the transaction rolls back.
    """
    started = time.perf_counter()
    if mode == CorpusIngestion.Mode.REPLACE:
        Chunk.objects.filter(corpus=corpus).delete()
        Document.objects.filter(corpus=corpus).delete()
    start = 0
    if mode == CorpusIngestion.Mode.APPEND:
        last = Document.objects.filter(corpus=corpus).order_by("-position").first()
        start = last.position + 1 if last else 0
    safe_name = _safe_filename(filename, "corpus.jsonl")
    ingestion = CorpusIngestion.objects.create(
        corpus=corpus,
        mode=mode,
        original_filename=safe_name,
        storage_path="",
        size_bytes=0,
        sha256="",
        schema_version=schema_version,
        records=0,
        seconds=0,
        uploaded_by=user,
    )
    report = JsonlReport()
    writer = DocumentWriter(corpus=corpus, ingestion=ingestion, report=report, start_position=start)
    upload.seek(0)
    for item in iter_corpus_records(upload, report, schema_version):
        writer.add(item)
    writer.close()
    if report.valid and writer.records == 0:
        report.add_error(1, "", "the file holds no documents")
    if not report.valid:
        raise InvalidInput(
            report.summary("corpus file"),
            details={"errors": report.errors, "total": report.error_total},
        )
    notes = []
    if schema_version != CURRENT_CORPUS_VERSION:
        notes.append(
            f"Uploaded in schema v{schema_version} (older than the current "
            f"v{CURRENT_CORPUS_VERSION}): {writer.records:,} record(s) upgraded "
            f"{describe_path(schema_version, CURRENT_CORPUS_VERSION)} on ingestion."
        )
    if report.byte_order_mark:
        notes.append("A UTF-8 byte-order mark at the start of the file was ignored.")
    if report.blank_lines:
        notes.append(f"{report.blank_lines:,} blank line(s) skipped.")
    upload.seek(0)
    path = storage_save(f"corpora/{corpus.pk}/uploads/{ingestion.pk}-{safe_name}", upload)
    stored.append(path)
    seconds = max(time.perf_counter() - started, 1e-6)
    ingestion.storage_path = path
    ingestion.size_bytes = report.size_bytes
    ingestion.sha256 = report.sha256
    ingestion.records = writer.records
    ingestion.chunks = writer.chunks
    ingestion.seconds = round(seconds, 4)
    ingestion.errors = 0
    ingestion.notes = notes
    ingestion.metrics = {
        "records": writer.records,
        "chunks": writer.chunks,
        "bytes": report.size_bytes,
        "lines": report.lines,
        "blank_lines": report.blank_lines,
        "seconds": round(seconds, 4),
        "records_per_second": round(writer.records / seconds, 1),
        "megabytes_per_second": round(report.size_bytes / 1e6 / seconds, 2),
        "errors": 0,
        "problems": writer.problem_total,
    }
    ingestion.save()
    _refresh(corpus, notes=notes, summary=writer.summary if mode != "append" else None)
    if mode == CorpusIngestion.Mode.APPEND:
        corpus.problems = (corpus.problems + writer.problems)[:50]
    else:
        corpus.problems = writer.problems
    corpus.status = Corpus.Status.PROBLEMS if corpus.problems else Corpus.Status.READY
    corpus.source_schema_version = schema_version
    corpus.size_bytes = (0 if mode == "replace" else corpus.size_bytes) + report.size_bytes
    corpus.save()
    return ingestion


def _refresh(corpus: Corpus, *, notes: list[str], summary: StreamSummary | None) -> None:
    """Counts, statistics and checksum: from the stream when it held the whole corpus
    (a new corpus, a replacement), else from the database."""
    whole = summary is not None and summary.complete
    stats = summary.statistics() if whole else corpus_statistics(corpus)
    corpus.stats = stats
    corpus.record_count = stats["documents"]
    corpus.chunk_count = stats["chunks"]
    corpus.token_count = stats["tokens"]
    corpus.checksum = summary.checksum() if whole else corpus_checksum(corpus)
    corpus.schema_version = CURRENT_CORPUS_VERSION
    corpus.notes = (corpus.notes + notes)[-20:]


def _run_ingestion(corpus_factory, **kwargs) -> tuple[Corpus, CorpusIngestion]:
    stored: list[str] = []
    try:
        with transaction.atomic():
            corpus = corpus_factory()
            ingestion = _ingest(corpus=corpus, stored=stored, **kwargs)
    except Exception:
        for path in stored:
            storage_delete(path)
        raise
    logger.info(
        "corpus %s: %s %s records (%s bytes) in %.2f s, %.0f records/s",
        corpus.pk,
        ingestion.mode,
        ingestion.records,
        ingestion.size_bytes,
        ingestion.seconds,
        ingestion.records_per_second,
    )
    return corpus, ingestion


def corpus_create(
    *,
    name: str,
    upload: IO[bytes],
    user: AbstractUser | None,
    filename: str = "corpus.jsonl",
    description: str = "",
    schema_version: str = CURRENT_CORPUS_VERSION,
) -> Corpus:
    """Validate a JSONL corpus and store it as a new corpus; an invalid file writes nothing."""
    version = _version(schema_version)
    name = name.strip()
    if not name:
        raise InvalidInput(
            "The corpus needs a name.",
            details={"fields": [{"field": "name", "message": "required"}]},
        )

    def make() -> Corpus:
        return Corpus.objects.create(
            name=name[:200],
            description=description,
            schema_version=CURRENT_CORPUS_VERSION,
            source_schema_version=version,
            uploaded_by=user,
        )

    corpus, _ = _run_ingestion(
        make,
        upload=upload,
        user=user,
        filename=filename,
        schema_version=version,
        mode=CorpusIngestion.Mode.CREATE,
    )
    return corpus


def corpus_upload(
    *,
    corpus: Corpus,
    upload: IO[bytes],
    user: AbstractUser | None,
    mode: str = CorpusIngestion.Mode.APPEND,
    filename: str = "corpus.jsonl",
    schema_version: str = CURRENT_CORPUS_VERSION,
) -> CorpusIngestion:
    """Append documents to a corpus, or replace its documents; all or nothing."""
    version = _version(schema_version)
    if mode not in (CorpusIngestion.Mode.APPEND, CorpusIngestion.Mode.REPLACE):
        raise InvalidInput(
            f"Unknown mode '{mode}': use 'append' or 'replace'.",
            details={"fields": [{"field": "mode", "message": "append or replace"}]},
        )
    if corpus.status == Corpus.Status.ARCHIVED:
        raise Conflict(f"Corpus '{corpus.name}' is archived.", details={"id": str(corpus.pk)})

    def locked() -> Corpus:
        return Corpus.objects.select_for_update().get(pk=corpus.pk)

    _, ingestion = _run_ingestion(
        locked,
        upload=upload,
        user=user,
        filename=filename,
        schema_version=version,
        mode=mode,
    )
    corpus.refresh_from_db()
    return ingestion


def training_file_create(
    *,
    name: str,
    upload: IO[bytes],
    user: AbstractUser | None,
    filename: str = "training.jsonl",
    description: str = "",
    schema_version: str = "1",
) -> TrainingFile:
    """Validate a JSONL training file and store it; an invalid file writes nothing."""
    upload.seek(0)
    report = validate_training_file(upload, schema_version)
    if not report.valid:
        raise InvalidInput(
            report.summary("training file"),
            details={"errors": report.errors, "total": report.error_total},
        )
    file_id = uuid.uuid4()
    safe_name = _safe_filename(filename, "training.jsonl")
    upload.seek(0)
    path = storage_save(f"training-files/{file_id}/{safe_name}", upload)
    try:
        with transaction.atomic():
            training_file = TrainingFile.objects.create(
                id=file_id,
                name=name,
                description=description,
                schema_version=schema_version,
                format=report.format or TrainingFile.Format.CRUCIBLE,
                storage_path=path,
                original_filename=safe_name,
                size_bytes=report.size_bytes,
                sha256=report.sha256,
                status=TrainingFile.Status.PROBLEMS
                if report.problems
                else TrainingFile.Status.READY,
                validation_errors=report.problems[:50],
                conversation_count=report.conversations,
                pair_count=report.pairs,
                word_count=report.words,
                token_count=report.tokens,
                stats=report.stats(),
                uploaded_by=user,
            )
    except Exception:
        storage_delete(path)
        raise
    logger.info(
        "training file %s stored: %s conversations, %s pairs, %s bytes",
        training_file.pk,
        report.conversations,
        report.pairs,
        report.size_bytes,
    )
    return training_file


# --- Exports ----------------------------------------------------------------------------------


def export_create(
    *,
    user: AbstractUser | None,
    formats: list[str],
    corpus: Corpus | None = None,
    training_file: TrainingFile | None = None,
    unit: str | None = None,
    splits: dict[str, float] | None = None,
    seed: int = 42,
    stratify_by: str | None = None,
    field_mapping: dict[str, str] | None = None,
    csv_options: dict | None = None,
    name: str = "",
) -> Export:
    """Check the options, record the export and queue its task (after commit)."""
    from corpora.tasks import export_run_task

    if (corpus is None) == (training_file is None):
        raise InvalidInput("An export needs exactly one source: a corpus or a training file.")
    parameters = exports.check_parameters(
        source_kind="corpus" if corpus else "training_file",
        formats=formats,
        unit=unit,
        splits=splits,
        seed=seed,
        stratify_by=stratify_by,
        field_mapping=field_mapping,
        csv_options=csv_options,
        name=name or (corpus or training_file).name,
    )
    if corpus is not None and corpus.record_count == 0:
        raise Conflict(f"Corpus '{corpus.name}' has no documents to export.")
    export = Export.objects.create(
        corpus=corpus,
        training_file=training_file,
        unit=parameters.pop("unit"),
        formats=parameters.pop("formats"),
        parameters=parameters,
        created_by=user,
        progress_message="Waiting for a worker",
    )
    transaction.on_commit(lambda: export_run_task.delay(str(export.pk)))
    return export


def export_run(*, export_id: uuid.UUID | str) -> Export | None:
    """Claim a queued export and run it: write, validate, store, then offer it.

    Returns None when another worker already claimed it.
    """
    claimed = Export.objects.filter(pk=export_id, status=Export.Status.QUEUED).update(
        status=Export.Status.RUNNING,
        started_at=timezone.now(),
        progress=0.0,
        progress_message="Starting",
    )
    if claimed != 1:
        return None
    export = Export.objects.with_source().get(pk=export_id)
    try:
        exports.run(export)
    except Exception as exc:
        logger.exception("export %s failed", export.pk)
        message = exc.message if isinstance(exc, InvalidInput | Conflict) else str(exc)
        export.mark_failed(f"{type(exc).__name__}: {message}")
        return export
    return export


def corpus_document_delete(*, document: Document) -> None:
    """Remove one document and its chunks from its corpus (counts and checksum refreshed).
    Knowledge bases over the corpus stop returning its chunks at once (retrieval reads the
    chunks back); their next update tombstones the vectors."""
    with transaction.atomic():
        corpus = Corpus.objects.select_for_update().get(pk=document.corpus_id)
        Chunk.objects.filter(document=document).delete()
        Document.objects.filter(pk=document.pk).delete()
        _refresh(corpus, notes=[], summary=None)
        corpus.save()
