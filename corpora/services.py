"""Corpus and training-file workflows."""

from __future__ import annotations

import logging
import uuid
from pathlib import PurePath
from typing import IO

from django.contrib.auth.models import AbstractUser
from django.db import transaction

from config.errors import InvalidInput
from config.storage import storage_delete, storage_save
from corpora.models import TrainingFile
from corpora.validation import validate_training_file

logger = logging.getLogger("crucible.corpora")


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
    if report.schema_errors:
        raise InvalidInput(
            f"The training file is not valid: {report.schema_error_total} error(s); first on "
            f"line {report.schema_errors[0]['line']}: {report.schema_errors[0]['message']}",
            details={"errors": report.schema_errors, "total": report.schema_error_total},
        )
    file_id = uuid.uuid4()
    safe_name = PurePath(filename).name or "training.jsonl"
    upload.seek(0)
    path = storage_save(f"training-files/{file_id}/{safe_name}", upload)
    try:
        with transaction.atomic():
            training_file = TrainingFile.objects.create(
                id=file_id,
                name=name,
                description=description,
                schema_version=schema_version,
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
