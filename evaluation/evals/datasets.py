"""Evaluation dataset uploads: JSONL validated line by line with the corpora's machinery
(corpora/validation.py: bounded line reads, sha256 as it reads, BOM/UTF-8/truncation
explanations, errors as ``{"line", "pointer", "message"}``) against
schemas/eval_dataset/v1.json. Nothing is written unless every line is valid."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import IO

import jsonschema_rs
from django.db import IntegrityError, transaction
from django.db.models import Max
from jsonschema import Draft202012Validator

from config.errors import InvalidInput
from corpora.schemas import SchemaValidator
from corpora.validation import JsonlReport, iter_jsonl
from evaluation.models import EvalDataset, EvalSample

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "eval_dataset" / "v1.json"
MAX_SAMPLES = 100_000


@cache
def dataset_validator() -> SchemaValidator:
    schema = json.loads(SCHEMA_PATH.read_text("utf-8"))
    Draft202012Validator.check_schema(schema)
    return SchemaValidator(
        schema=schema,
        fast=jsonschema_rs.validator_for(schema),
        slow=Draft202012Validator(schema),
    )


def validate_dataset(stream: IO[bytes]) -> tuple[JsonlReport, list[tuple[int, dict]]]:
    report = JsonlReport()
    validator = dataset_validator()
    records: list[tuple[int, dict]] = []
    seen_ids: dict[str, int] = {}
    for number, record in iter_jsonl(stream, report):
        if not isinstance(record, dict):
            report.add_error(number, "", "each line must be a JSON object (one sample)")
            continue
        if not validator.is_valid(record):
            pointer, message = validator.explain(record) or ("", "invalid record")
            report.add_error(number, pointer, message)
            continue
        if "id" in record:
            if record["id"] in seen_ids:
                report.add_error(
                    number,
                    "/id",
                    f"duplicate id {record['id']!r} (first on line {seen_ids[record['id']]})",
                )
                continue
            seen_ids[record["id"]] = number
        records.append((number, record))
        if len(records) > MAX_SAMPLES:
            report.add_error(number, "", f"more than {MAX_SAMPLES:,} samples")
            break
    if report.valid and not records:
        report.add_error(1, "", "the file has no samples")
    return report, records


def dataset_create(*, user, name: str, stream: IO[bytes], description: str = "") -> EvalDataset:
    """Validate and store a new version of dataset ``name``; InvalidInput (with every line
    error, up to 50) and nothing written when any line is invalid."""
    report, records = validate_dataset(stream)
    if not report.valid:
        raise InvalidInput(
            report.summary("dataset"),
            details={"errors": report.errors, "error_total": report.error_total},
        )
    for _ in range(3):  # two uploads of the same name at once: the loser takes the next number
        try:
            with transaction.atomic():
                latest = EvalDataset.objects.filter(name=name).aggregate(v=Max("version"))["v"]
                dataset = EvalDataset.objects.create(
                    name=name,
                    version=(latest or 0) + 1,
                    description=description,
                    sha256=report.sha256,
                    size_bytes=report.size_bytes,
                    sample_count=len(records),
                    created_by=user if getattr(user, "pk", None) else None,
                )
                EvalSample.objects.bulk_create(
                    [
                        EvalSample(
                            dataset=dataset,
                            index=i,
                            line=line,
                            input=r["input"],
                            reference=r.get("reference", ""),
                            contexts=r.get("contexts", []),
                            metadata={
                                **r.get("metadata", {}),
                                **({"id": r["id"]} if "id" in r else {}),
                                **({"output": r["output"]} if "output" in r else {}),
                            },
                        )
                        for i, (line, r) in enumerate(records)
                    ],
                    batch_size=1000,
                )
                return dataset
        except IntegrityError:
            continue
    raise InvalidInput(f"Could not number a new version of {name!r}; try again.")
