"""Batch LLM jobs API: /api/v1/jobs (create, list, detail, estimate, pause/resume/cancel),
tasks with their prompt and output, statistics and charts, exports, frameworks."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from uuid import UUID

from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from ninja import Field, Query, Router, Schema

from config.api_routes import ERRORS
from config.auth import requires
from config.errors import NotFound
from jobs.batch import results, services
from jobs.batch.models import BatchJob, BatchTask, FrameworkVersion

router = Router(tags=["batch jobs"])
READ = requires("view_dashboard")
RUN = requires("run_jobs")


class Selection(Schema):
    chunk_ids: list[int] = Field(default_factory=list, description="Chunk ids (corpus-wide)")
    document_ids: list[str] = Field(default_factory=list, description="Documents' own ids")
    filter: dict | None = Field(
        None, description='{"document_type", "language", "author", "q", "meta": ["key:value"]}'
    )
    all: bool = Field(False, description="Every chunk of the corpus")


class JobIn(Schema):
    corpus: UUID
    selection: Selection
    frameworks: list[str] = Field(..., description='"name" (newest version) or "name@version"')
    models: list[str] = Field(..., description="Registry keys of chat models")
    runs: int | None = Field(None, description="Runs per model, 1-20 (default: the gateway's)")
    decoding: dict = Field(default_factory=dict, description="temperature, top_p, max_tokens, seed")
    name: str = Field("", max_length=200)


class JobOut(Schema):
    id: UUID
    name: str
    status: str
    corpus: UUID
    created_by: str | None
    runs: int
    task_count: int
    estimate_prompt_tokens: int
    estimate_completion_tokens: int
    estimate_cost: Decimal
    parameters_sha256: str
    frozen: dict
    created_at: datetime
    finished_at: datetime | None
    progress: dict | None = None

    @staticmethod
    def resolve_corpus(obj) -> UUID:
        return obj.corpus_id

    @staticmethod
    def resolve_created_by(obj) -> str | None:
        return obj.created_by.username if obj.created_by else None


class JobListOut(Schema):
    id: UUID
    name: str
    status: str
    task_count: int
    finished: int
    cost: Decimal
    estimate_cost: Decimal
    created_by: str | None
    created_at: datetime


class TaskOut(Schema):
    id: str
    chunk_id: int
    framework: str
    model_key: str
    run: int
    status: str
    attempts: int
    calls: int
    repairs: int
    latency_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal
    error_code: str
    error_message: str
    model_revision: str
    started_at: datetime | None
    finished_at: datetime | None

    @staticmethod
    def resolve_framework(obj) -> str:
        return obj.framework_version.label


class TaskDetailOut(TaskOut):
    messages: list[dict]
    raw_output: str
    parsed_output: dict | list | None
    validation_errors: list


class TasksQuery(Schema):
    status: str | None = None
    model: str | None = None
    error_code: str | None = None
    limit: int = Field(100, ge=1, le=1000)
    offset: int = Field(0, ge=0)


class FrameworkOut(Schema):
    name: str
    version: str
    sha256: str
    title: str
    fields: list[dict]


def _job_or_404(job_id) -> BatchJob:
    return services.job_get(job_id)


@router.get("/frameworks", response={200: list[FrameworkOut], **ERRORS}, auth=READ)
def frameworks_list(request: HttpRequest):
    services.framework_sync()
    rows = FrameworkVersion.objects.select_related("framework").order_by("framework__name", "pk")
    return [
        {
            "name": r.framework.name,
            "version": r.version,
            "sha256": r.sha256,
            "title": r.content["title"],
            "fields": r.fields,
        }
        for r in rows
    ]


@router.post("/jobs/estimate", response={200: dict, **ERRORS}, auth=RUN)
def jobs_estimate(request: HttpRequest, payload: JobIn):
    """Task count, token and cost estimate and the budget check; writes nothing."""
    plan = services.job_plan(
        corpus_id=payload.corpus,
        selection=payload.selection.dict(),
        frameworks=payload.frameworks,
        models=payload.models,
        runs=payload.runs,
        decoding=payload.decoding,
    )
    return plan.as_dict()


@router.post("/jobs", response={201: JobOut, **ERRORS}, auth=RUN)
def jobs_create(request: HttpRequest, payload: JobIn):
    job = services.job_create(
        user=request.auth,
        corpus_id=payload.corpus,
        selection=payload.selection.dict(),
        frameworks=payload.frameworks,
        models=payload.models,
        runs=payload.runs,
        decoding=payload.decoding,
        name=payload.name,
    )
    job = services.job_get(job.pk)
    job.progress = results.progress(job)
    return 201, job


@router.get("/jobs", response={200: list[JobListOut], **ERRORS}, auth=READ)
def jobs_list(request: HttpRequest, limit: int = Query(50, ge=1, le=200)):
    return list(_list_rows(limit))


def _list_rows(limit: int):
    from django.db.models import Count, Q, Sum

    qs = (
        BatchJob.objects.frameworks()
        .select_related("created_by")
        .annotate(
            finished=Count("tasks", filter=Q(tasks__status__in=("succeeded", "failed"))),
            cost=Sum("tasks__cost"),
        )
        .order_by("-created_at")[:limit]
    )
    for job in qs:
        yield {
            "id": job.pk,
            "name": job.name,
            "status": job.status,
            "task_count": job.task_count,
            "finished": job.finished,
            "cost": job.cost or Decimal(0),
            "estimate_cost": job.estimate_cost,
            "created_by": job.created_by.username if job.created_by else None,
            "created_at": job.created_at,
        }


@router.get("/jobs/{job_id}", response={200: JobOut, **ERRORS}, auth=READ)
def jobs_get(request: HttpRequest, job_id: UUID):
    job = _job_or_404(job_id)
    job.progress = results.progress(job)
    return job


@router.post("/jobs/{job_id}/pause", response={200: JobOut, **ERRORS}, auth=RUN)
def jobs_pause(request: HttpRequest, job_id: UUID):
    return services.job_pause(job=_job_or_404(job_id))


@router.post("/jobs/{job_id}/resume", response={200: JobOut, **ERRORS}, auth=RUN)
def jobs_resume(request: HttpRequest, job_id: UUID):
    return services.job_resume(job=_job_or_404(job_id))


@router.post("/jobs/{job_id}/cancel", response={200: JobOut, **ERRORS}, auth=RUN)
def jobs_cancel(request: HttpRequest, job_id: UUID):
    return services.job_cancel(job=_job_or_404(job_id))


@router.get("/jobs/{job_id}/tasks", response={200: list[TaskOut], **ERRORS}, auth=READ)
def jobs_tasks(request: HttpRequest, job_id: UUID, q: Query[TasksQuery]):
    job = _job_or_404(job_id)
    qs = job.tasks.select_related("framework_version__framework").defer(
        "raw_output", "parsed_output"
    )
    if q.status:
        qs = qs.filter(status=q.status)
    if q.model:
        qs = qs.filter(model_key=q.model)
    if q.error_code:
        qs = qs.filter(error_code=q.error_code)
    return list(qs.order_by("id")[q.offset : q.offset + q.limit])


@router.get("/jobs/{job_id}/tasks/{task_id}", response={200: TaskDetailOut, **ERRORS}, auth=READ)
def jobs_task(request: HttpRequest, job_id: UUID, task_id: str):
    task = (
        BatchTask.objects.select_related("framework_version__framework", "chunk__document")
        .filter(job_id=job_id, pk=task_id)
        .first()
    )
    if task is None:
        raise NotFound(f"No task {task_id} in job {job_id}.")
    task.messages = services.task_messages(task)
    return task


@router.get("/jobs/{job_id}/stats", response={200: dict, **ERRORS}, auth=READ)
def jobs_stats(request: HttpRequest, job_id: UUID):
    """Per-text statistics and agreement (recomputed when tasks finished since)."""
    job = _job_or_404(job_id)
    snapshot = results.stats_refresh(job_id=job.pk, force=not job.is_active)
    return {"computed_at": snapshot.computed_at.isoformat(), **snapshot.data}


@router.get("/jobs/{job_id}/charts", response={200: dict, **ERRORS}, auth=READ)
def jobs_charts(request: HttpRequest, job_id: UUID):
    """Chart-ready series: per-unit means with intervals per model, agreement with intervals."""
    job = _job_or_404(job_id)
    snapshot = results.stats_refresh(job_id=job.pk, force=not job.is_active)
    return {"tasks_done": snapshot.tasks_done, **results.charts(job, snapshot.data)}


@router.get("/jobs/{job_id}/export.zip", auth=READ, response={200: None, **ERRORS})
def jobs_export(request: HttpRequest, job_id: UUID):
    job = _job_or_404(job_id)
    response = HttpResponse(results.replication_package(job), content_type="application/zip")
    response["Content-Disposition"] = f'attachment; filename="batch-{job.pk}.zip"'
    return response


@router.get("/jobs/{job_id}/openai-batch/{which}", auth=READ, response={200: None, **ERRORS})
def jobs_openai_batch(request: HttpRequest, job_id: UUID, which: str):
    """``requests.jsonl`` (an OpenAI Batch input file) or ``results.jsonl`` (its output
    shape), matched by custom_id."""
    job = _job_or_404(job_id)
    if which == "requests.jsonl":
        lines = services.openai_batch_requests(job=job)
    elif which == "results.jsonl":
        lines = services.openai_batch_results(job=job)
    else:
        raise NotFound("Use requests.jsonl or results.jsonl.")
    response = StreamingHttpResponse(
        (line + "\n" for line in lines), content_type="application/jsonl"
    )
    response["Content-Disposition"] = f'attachment; filename="batch-{job.pk}-{which}"'
    return response
