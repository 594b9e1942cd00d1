"""Evaluation routes on the public /v1/ API: datasets, rubrics, single evaluations, batch
evaluations (with drill-down and exports) and the metrics JSON. Attached to
``jobs.public_api.public_api`` from evaluation's AppConfig (evaluation -> jobs only).

Roles: every signed-in role reads; uploading, evaluating and launching need a role that does
work (engineer, analyst, admin): a viewer gets 403 there.
"""

from __future__ import annotations

import csv
import io
import re
from datetime import datetime
from typing import Literal
from uuid import UUID

import orjson
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from ninja import File, Form, Query, Router, Schema
from ninja.files import UploadedFile
from pydantic import Field

from config.api import documented_errors
from config.errors import InvalidInput
from evaluation.evals import aggregates as agg
from evaluation.evals import datasets, rubrics, services
from evaluation.models import BatchEval, EvalDataset, EvalRun
from jobs.public_api import CHAT_AUTH, LOOKUP_ERRORS, MODEL_CALL_ERRORS

router = Router(tags=["evaluation"])
MAX_UPLOAD_BYTES = 64 * 1024 * 1024
NAME = re.compile(r"^[-a-zA-Z0-9_]{1,100}$")
# The largest offset a history page may start at (a bigger one overflows the database's integer).
MAX_OFFSET = 1_000_000_000


# --- Schemas ------------------------------------------------------------------------------------


class DatasetOut(Schema):
    id: int
    name: str
    version: int
    label: str
    description: str
    sha256: str
    size_bytes: int
    sample_count: int
    schema_version: str
    created_at: datetime


class EvaluateIn(Schema):
    rubric: str = Field(min_length=1, max_length=140, description="name or name@version")
    model: str | None = Field(default=None, max_length=300, description="answers the input")
    input: str | None = Field(default=None, max_length=50000)
    reference: str = Field(default="", max_length=50000)
    contexts: list[str] = Field(default_factory=list, max_length=50)
    output: str | None = Field(default=None, max_length=50000, description="score this answer")
    dataset_id: int | None = None
    sample_index: int | None = Field(default=None, ge=0)
    decoding: dict = Field(default_factory=dict)
    judge_model: str | None = Field(default=None, max_length=300)
    embed_model: str | None = Field(default=services.DEFAULT_EMBED_MODEL, max_length=300)


class BatchEvalIn(Schema):
    dataset: int
    models: list[str] = Field(min_length=1, max_length=8)
    rubric: str = Field(min_length=1, max_length=140)
    runs: int = Field(default=1, ge=1, le=20)
    name: str = Field(default="", max_length=200)
    decoding: dict = Field(default_factory=dict)
    judge_model: str | None = Field(default=None, max_length=300)
    embed_model: str | None = Field(default=services.DEFAULT_EMBED_MODEL, max_length=300)


class SampleFilter(Schema):
    model: str | None = None
    failure: Literal[(*agg.FAILURES, "any")] | None = Field(  # type: ignore[valid-type]
        default=None, description="a taxonomy class, or 'any'"
    )
    passed: bool | None = None
    status: str | None = None
    dimension: str | None = Field(default=None, description="with bin_low/bin_high")
    bin_low: float | None = None
    bin_high: float | None = None
    limit: int = Field(default=100, ge=1, le=1000)
    offset: int = Field(default=0, ge=0)


def run_out(run: EvalRun) -> dict:
    return {
        "id": str(run.pk),
        "batch_id": str(run.batch_id) if run.batch_id else None,
        "dataset": run.dataset.label if run.dataset_id and run.dataset else None,
        "sample_index": run.sample_index,
        "model": run.model_key or None,
        "run": run.run,
        "rubric": {"name": run.rubric, "version": run.rubric_version, "sha256": run.rubric_sha256},
        "input": run.input,
        "reference": run.reference,
        "contexts": run.contexts,
        "output": run.output,
        "status": run.status,
        "passed": run.passed,
        "failure": run.failure or None,
        "error": run.error_message or None,
        "scores": run.scores,
        "judge": run.judge,
        "metadata": run.metadata,
        "latency_ms": run.latency_ms,
        "prompt_tokens": run.prompt_tokens,
        "completion_tokens": run.completion_tokens,
        "cost": str(run.cost),
        "attempts": run.attempts,
        "created_at": run.created_at.isoformat(),
        "started_at": run.started_at.isoformat() if run.started_at else None,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
    }


def batch_out(batch: BatchEval, *, with_aggregates: bool = True) -> dict:
    data = {
        "id": str(batch.pk),
        "name": batch.name,
        "status": batch.status,
        "dataset": {"id": batch.dataset_id, "label": batch.dataset.label},
        "models": batch.models_list,
        "rubric": {
            "name": batch.rubric,
            "version": batch.rubric_version,
            "sha256": batch.rubric_sha256,
        },
        "runs": batch.runs,
        "items": batch.item_count,
        "frozen": batch.frozen,
        "error": batch.error_message or None,
        "created_at": batch.created_at.isoformat(),
        "started_at": batch.started_at.isoformat() if batch.started_at else None,
        "finished_at": batch.finished_at.isoformat() if batch.finished_at else None,
    }
    if with_aggregates:
        live = (
            batch.aggregates if batch.aggregates and not batch.is_active else agg.aggregates(batch)
        )
        data["progress"] = live["progress"]
        data["aggregates"] = {k: live[k] for k in ("overall", "models", "comparisons", "final")}
    return data


# --- Datasets and rubrics -----------------------------------------------------------------------


@router.post(
    "/datasets",
    auth=CHAT_AUTH,
    response={201: DatasetOut},
    summary="Upload a dataset",
    openapi_extra=documented_errors(403),
)
def dataset_upload(
    request: HttpRequest,
    file: File[UploadedFile],
    name: str = Form(..., pattern=NAME.pattern),
    description: Form[str] = "",
):
    """JSONL, one sample a line: ``{"input", "reference"?, "contexts"?, "metadata"?, "id"?,
    "output"?}`` (schemas/eval_dataset/v1.json). Validated line by line; on any error a 422
    lists each line, JSON pointer and message, and nothing is written."""
    if not NAME.match(name or ""):
        raise InvalidInput("name: 1-100 letters, digits, '-' or '_'.", details={"field": "name"})
    if file.size and file.size > MAX_UPLOAD_BYTES:
        raise InvalidInput(f"The file is over {MAX_UPLOAD_BYTES // 2**20} MiB.")
    dataset = datasets.dataset_create(
        user=request.auth, name=name, stream=file.file, description=description
    )
    return 201, dataset


@router.get("/datasets", response=list[DatasetOut], summary="Evaluation datasets")
def dataset_list(request: HttpRequest):
    return list(EvalDataset.objects.all()[:500])


@router.get(
    "/datasets/{int:dataset_id}",
    response=DatasetOut,
    summary="One dataset",
    openapi_extra=LOOKUP_ERRORS,
)
def dataset_get(request: HttpRequest, dataset_id: int):
    from config.errors import NotFound

    dataset = EvalDataset.objects.filter(pk=dataset_id).first()
    if dataset is None:
        raise NotFound(f"No dataset {dataset_id}.")
    return dataset


@router.get("/rubrics", summary="Rubrics with their scoring schema")
def rubric_list(request: HttpRequest):
    return {"data": [r.public() for r in rubrics.all_rubrics().values()]}


# --- Single evaluations -------------------------------------------------------------------------


@router.post(
    "/evaluate",
    auth=CHAT_AUTH,
    response={201: dict},
    summary="Evaluate one sample",
    openapi_extra=MODEL_CALL_ERRORS,
)
def evaluate(request: HttpRequest, payload: EvaluateIn):
    run = services.evaluation_create(user=request.auth, **payload.dict())
    return 201, run_out(run)


@router.get("/evals", summary="Evaluation history (single evaluations, newest first)")
def eval_list(
    request: HttpRequest,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
):
    runs = EvalRun.objects.filter(batch__isnull=True).select_related("dataset")
    total = runs.count()
    page = list(runs[offset : offset + limit])
    return {"total": total, "data": [run_out(r) for r in page]}


@router.get(
    "/evals/{uuid:run_id}",
    summary="One evaluation run with its metadata",
    openapi_extra=LOOKUP_ERRORS,
)
def eval_get(request: HttpRequest, run_id: UUID):
    return run_out(services.evaluation_get(run_id))


# --- Batch evaluations --------------------------------------------------------------------------


@router.post(
    "/batch-evals",
    auth=CHAT_AUTH,
    response={202: dict},
    summary="Start a batch eval",
    openapi_extra=documented_errors(403, 404, 409, 503),
)
def batch_create(request: HttpRequest, payload: BatchEvalIn):
    fields = payload.dict()
    fields["dataset_id"] = fields.pop("dataset")
    batch = services.batch_eval_create(user=request.auth, **fields)
    batch.refresh_from_db()
    return 202, batch_out(batch)


@router.get("/batch-evals", summary="Batch evaluations, newest first")
def batch_list(request: HttpRequest, limit: int = Query(50, ge=1, le=500)):
    batches = BatchEval.objects.select_related("dataset")[:limit]
    return {"data": [batch_out(b, with_aggregates=False) for b in batches]}


@router.get(
    "/batch-evals/{uuid:batch_id}",
    summary="Status, progress and aggregates",
    openapi_extra=LOOKUP_ERRORS,
)
def batch_get(request: HttpRequest, batch_id: UUID):
    return batch_out(services.batch_eval_get(batch_id))


@router.post(
    "/batch-evals/{uuid:batch_id}/cancel",
    auth=CHAT_AUTH,
    summary="Cancel",
    openapi_extra=documented_errors(403, 404),
)
def batch_cancel(request: HttpRequest, batch_id: UUID):
    return batch_out(services.batch_eval_cancel(batch=services.batch_eval_get(batch_id)))


def filtered_items(batch: BatchEval, f: SampleFilter):
    items = batch.items.select_related("dataset").order_by("sample_index", "model_key", "run")
    if f.model:
        items = items.filter(model_key=f.model)
    if f.failure == "any":
        items = items.exclude(failure="")
    elif f.failure:
        if f.failure not in agg.FAILURES:
            raise InvalidInput(
                f"Unknown failure class {f.failure!r}; one of {', '.join(agg.FAILURES)} or any."
            )
        items = items.filter(failure=f.failure)
    if f.passed is not None:
        items = items.filter(passed=f.passed)
    if f.status:
        items = items.filter(status=f.status)
    rows = list(items)
    if f.dimension:
        low = f.bin_low if f.bin_low is not None else 0.0
        high = f.bin_high if f.bin_high is not None else 1.0

        def inside(run: EvalRun) -> bool:
            value = (run.scores.get(f.dimension) or {}).get("value")
            if value is None:
                return False
            return low <= value < high or (high >= 1.0 and value == high)

        rows = [r for r in rows if inside(r)]
    return rows


@router.get(
    "/batch-evals/{uuid:batch_id}/samples",
    summary="Drill-down to the items",
    openapi_extra=LOOKUP_ERRORS,
)
def batch_samples(request: HttpRequest, batch_id: UUID, filters: Query[SampleFilter]):
    batch = services.batch_eval_get(batch_id)
    rows = filtered_items(batch, filters)
    page = rows[filters.offset : filters.offset + filters.limit]
    return {"total": len(rows), "data": [run_out(r) for r in page]}


EXPORT_COLUMNS = [
    "id",
    "sample_index",
    "model",
    "run",
    "status",
    "passed",
    "failure",
    "error",
    "latency_ms",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "input",
    "output",
]


@router.get(
    "/batch-evals/{uuid:batch_id}/export",
    summary="Export items (jsonl or csv)",
    openapi_extra=LOOKUP_ERRORS,
)
def batch_export(request: HttpRequest, batch_id: UUID, format: Literal["jsonl", "csv"] = "jsonl"):
    batch = services.batch_eval_get(batch_id)
    rows = [
        run_out(r)
        for r in batch.items.select_related("dataset").order_by("sample_index", "model_key", "run")
    ]
    stem = f"batch-eval-{batch.pk}"
    if format == "jsonl":
        body = b"".join(orjson.dumps(r) + b"\n" for r in rows)
        response = HttpResponse(body, content_type="application/x-ndjson")
        response["Content-Disposition"] = f'attachment; filename="{stem}.jsonl"'
        return response
    if format == "csv":
        dims = [d["key"] for d in rubrics.rubric_get(batch.rubric).dimensions]
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(EXPORT_COLUMNS + [f"score_{d}" for d in dims])
        for r in rows:
            writer.writerow(
                [r[c] for c in EXPORT_COLUMNS]
                + [(r["scores"].get(d) or {}).get("value", "") for d in dims]
            )
        response = HttpResponse(out.getvalue(), content_type="text/csv")
        response["Content-Disposition"] = f'attachment; filename="{stem}.csv"'
        return response
    raise InvalidInput("format must be jsonl or csv", details={"field": "format"})


@router.get(
    "/batch-evals/{uuid:batch_id}/metrics-snapshot",
    summary="Aggregates snapshot (JSON)",
    openapi_extra=LOOKUP_ERRORS,
)
def batch_snapshot(request: HttpRequest, batch_id: UUID):
    batch = services.batch_eval_get(batch_id)
    data = batch_out(batch)
    data["snapshot_at"] = timezone.now().isoformat()
    response = HttpResponse(
        orjson.dumps(data, option=orjson.OPT_INDENT_2), content_type="application/json"
    )
    response["Content-Disposition"] = f'attachment; filename="batch-eval-{batch.pk}-metrics.json"'
    return response


# --- Metrics ------------------------------------------------------------------------------------


@router.get("/metrics", summary="Operational and evaluation KPIs (JSON)")
def metrics(request: HttpRequest, window_minutes: int = Query(60, ge=1, le=7 * 24 * 60)):
    from evaluation.evals.kpis import kpis

    return kpis(window_minutes=window_minutes)
