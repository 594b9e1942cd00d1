"""Training API under /api/v1/training/ (after the seed's routes)."""

from datetime import datetime
from typing import Literal
from uuid import UUID

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db.models import Q
from django.http import HttpRequest, HttpResponse
from ninja import Field, Query, Router, Schema
from ninja.pagination import paginate
from ninja.responses import Status
from ninja.security import APIKeyHeader

from config.api_routes import ERRORS, IsoDatetime, Omittable, PageNumberPagination
from config.auth import requires
from config.errors import InvalidInput, NotFound
from config.roles import require_change
from corpora.models import TrainingFile
from training import downloads, services
from training.executors import get_executor
from training.models import BaseModel, JobStatus, Preset, TrainingJob, WebhookEvent

router = Router(tags=["training"])


# --- Schemas --------------------------------------------------------------------------------


class PresetOut(Schema):
    key: str
    name: str
    summary: str
    explanation: str
    best_for: str
    hyperparameters: dict
    is_default: bool


class BaseModelOut(Schema):
    name: str
    display_name: str
    source: str
    parameters: int
    size_bytes: int
    context_length: int
    licence: str
    gated: bool


class JobIn(Schema):
    name: str = Field("", max_length=255)
    training_file_id: UUID
    base_model: str = Field("SmolLM2-135M-Instruct", description="Base model name")
    preset: str | None = Field(None, description="Preset key; the default preset when omitted")
    overrides: dict = Field(default_factory=dict, description="Hyperparameter overrides")
    executor: Literal["local", "runpod"] = "local"
    gpu_type: str = ""
    spot: bool = False
    description: str = ""
    notes: str = ""
    tags: list[str] = Field(default_factory=list, max_length=20)
    start: bool = Field(False, description="Start at once")
    override_reason: str = Field(
        "", max_length=500, description="Admin override of a budget refusal"
    )


class StartIn(Schema):
    override_reason: str = Field(
        "", max_length=500, description="Admin override of a budget refusal"
    )


class JobPatch(Schema):
    # Fields may be left out, not set to null (the columns are NOT NULL).
    name: str = Omittable(min_length=1, max_length=255)
    notes: str = Omittable()
    description: str = Omittable()
    tags: list[str] = Omittable(max_length=20)


class JobListOut(Schema):
    id: UUID
    name: str
    status: str
    progress: float
    current_step: int
    total_steps: int | None
    preset: str | None = Field(None, alias="preset.key")
    base_model: str = Field(..., alias="base_model.name")
    training_file_id: UUID
    executor: str
    tags: list[str]
    cost_estimate: float | None
    cost_actual: float
    recovery_count: int
    created_by: str | None = Field(None, alias="created_by.username")
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None


class JobOut(JobListOut):
    description: str
    notes: str
    configuration: dict
    current_epoch: float | None
    eta_seconds: float | None
    latest_metrics: dict
    error_type: str
    error_message: str
    error_details: dict
    retry_of_id: UUID | None
    retry_changes: list[dict]
    recovery_summary: str
    resume_check: dict
    dataset_report: dict
    warnings: list[dict]
    perplexity_baseline: float | None
    perplexity_trained: float | None
    perplexity_improvement_pct: float | None
    final_train_loss: float | None
    final_val_loss: float | None
    attempt: int
    gpu_type: str
    spot: bool
    last_heartbeat_at: datetime | None
    stages: list[dict]
    recoveries: list[dict]
    pods: list[dict]

    @staticmethod
    def resolve_stages(obj: TrainingJob) -> list[dict]:
        return [
            {"from": t.from_status, "to": t.to_status, "at": t.at, "reason": t.reason}
            for t in obj.transitions.all()
        ]

    @staticmethod
    def resolve_pods(obj: TrainingJob) -> list[dict]:
        return [
            {
                "pod_id": p.pod_id,
                "attempt": p.attempt,
                "gpu_type": p.gpu_type,
                "gpu_count": p.gpu_count,
                "spot": p.spot,
                "bid_per_gpu": float(p.bid_per_gpu) if p.bid_per_gpu is not None else None,
                "state": p.state,
                "created_at": p.created_at,
                "ended_at": p.ended_at,
                "terminated_at": p.terminated_at,
            }
            for p in obj.pods.all()
        ]

    @staticmethod
    def resolve_recoveries(obj: TrainingJob) -> list[dict]:
        return [
            {
                "reason": r.reason,
                "detected_at": r.detected_at,
                "relaunched_at": r.relaunched_at,
                "relaunch_seconds": r.relaunch_seconds,
                "from_step": r.from_step,
            }
            for r in obj.recoveries.all()
        ]


class MetricOut(Schema):
    step: int
    epoch: float | None
    train_loss: float | None
    val_loss: float | None
    learning_rate: float | None
    grad_norm: float | None
    tokens_per_second: float | None
    gpu_memory_mb: float | None
    elapsed_seconds: float | None
    eta_seconds: float | None


class EventOut(Schema):
    event_id: UUID
    type: str
    sequence: int | None
    payload: dict
    received_at: datetime
    processed: bool
    processing_error: str


class ArtifactOut(Schema):
    kind: str
    size_bytes: int
    created_at: datetime
    download_count: int


class JobFilters(Schema):
    status: list[JobStatus] | None = None
    creator: str | None = None
    preset: str | None = None
    tag: str | None = None
    q: str | None = Field(None, description="Search in names, notes and tags")
    created_after: IsoDatetime | None = None
    created_before: IsoDatetime | None = None
    sort: Literal["-created_at", "created_at", "name", "-name", "status", "-cost_actual"] = (
        "-created_at"
    )


# --- Helpers -------------------------------------------------------------------------------


def base_model_and_preset(name: str, key: str | None) -> tuple[BaseModel, Preset | None]:
    """The base model and preset a request names, or a 422 naming the unknown field."""
    base_model = BaseModel.objects.filter(name=name).first()
    if base_model is None:
        raise InvalidInput(
            f"No base model named '{name}'.",
            details={"fields": [{"field": "base_model", "message": "unknown"}]},
        )
    preset = None
    if key:
        preset = Preset.objects.filter(key=key).first()
        if preset is None:
            raise InvalidInput(
                f"No preset '{key}'.",
                details={"fields": [{"field": "preset", "message": "unknown"}]},
            )
    return base_model, preset


def _owned_job(request: HttpRequest, job_id: UUID) -> TrainingJob:
    """The job, for a change: its creator's or an admin's (config/roles.py)."""
    job = _job(job_id)
    require_change(request.auth, job, "this training job")
    return job


def _job(job_id: UUID, *, detail: bool = False) -> TrainingJob:
    queryset = TrainingJob.objects.for_list()
    if detail:
        queryset = queryset.prefetch_related("transitions", "recoveries", "pods")
    job = queryset.filter(pk=job_id).first()
    if job is None:
        raise NotFound(f"No training job {job_id}.", details={"id": str(job_id)})
    return job


# --- Catalogue ------------------------------------------------------------------------------


@router.get(
    "/training/presets", response={200: list[PresetOut], **ERRORS}, auth=requires("view_dashboard")
)
def presets_list(request: HttpRequest):
    return Preset.objects.all()


@router.get(
    "/training/base-models",
    response={200: list[BaseModelOut], **ERRORS},
    auth=requires("view_dashboard"),
)
def base_models_list(request: HttpRequest):
    return BaseModel.objects.filter(is_active=True)


# --- Jobs ----------------------------------------------------------------------------------


@router.get(
    "/training/jobs", response={200: list[JobListOut], **ERRORS}, auth=requires("view_dashboard")
)
@paginate(PageNumberPagination)
def jobs_list(request: HttpRequest, filters: Query[JobFilters]):
    jobs = TrainingJob.objects.for_list()
    if filters.status:
        jobs = jobs.filter(status__in=filters.status)
    if filters.creator:
        jobs = jobs.filter(created_by__username=filters.creator)
    if filters.preset:
        jobs = jobs.filter(preset__key=filters.preset)
    if filters.tag:
        # The JSON text holds each tag quoted; this works on SQLite and PostgreSQL alike.
        jobs = jobs.filter(tags__icontains=f'"{filters.tag.lower()}"')
    if filters.q:
        jobs = jobs.filter(
            Q(name__icontains=filters.q)
            | Q(notes__icontains=filters.q)
            | Q(tags__icontains=filters.q)
        )
    if filters.created_after:
        jobs = jobs.filter(created_at__gte=filters.created_after)
    if filters.created_before:
        jobs = jobs.filter(created_at__lt=filters.created_before)
    return jobs.order_by(filters.sort, "-id")


@router.post("/training/jobs", response={201: JobOut, **ERRORS}, auth=requires("run_jobs"))
def jobs_create(request: HttpRequest, payload: JobIn):
    training_file = TrainingFile.objects.filter(pk=payload.training_file_id).first()
    if training_file is None:
        raise InvalidInput(
            f"No training file {payload.training_file_id}.",
            details={"fields": [{"field": "training_file_id", "message": "not found"}]},
        )
    base_model, preset = base_model_and_preset(payload.base_model, payload.preset)
    if payload.executor != "local":
        raise InvalidInput(
            "Only the local executor is available on this installation.",
            details={"fields": [{"field": "executor", "message": "not configured"}]},
        )
    job = services.training_job_create(
        user=request.auth,
        training_file=training_file,
        base_model=base_model,
        preset=preset,
        name=payload.name,
        overrides=payload.overrides,
        executor=payload.executor,
        description=payload.description,
        notes=payload.notes,
        tags=payload.tags,
        gpu_type=payload.gpu_type,
        spot=payload.spot,
    )
    if payload.start:
        services.training_job_start(
            job=job, user=request.auth, override_reason=payload.override_reason
        )
    return Status(201, _job(job.pk, detail=True))


@router.get(
    "/training/jobs/{job_id}", response={200: JobOut, **ERRORS}, auth=requires("view_dashboard")
)
def jobs_get(request: HttpRequest, job_id: UUID):
    return _job(job_id, detail=True)


@router.patch(
    "/training/jobs/{job_id}", response={200: JobOut, **ERRORS}, auth=requires("run_jobs")
)
def jobs_update(request: HttpRequest, job_id: UUID, payload: JobPatch):
    job = _owned_job(request, job_id)
    changes = payload.dict(exclude_unset=True)
    if "tags" in changes:
        changes["tags"] = sorted({t.strip().lower() for t in changes["tags"] if t.strip()})
    for key, value in changes.items():
        setattr(job, key, value)
    job.save(update_fields=[*changes, "updated_at"])
    return _job(job_id, detail=True)


@router.delete("/training/jobs/{job_id}", response={204: None, **ERRORS}, auth=requires("run_jobs"))
def jobs_delete(request: HttpRequest, job_id: UUID):
    services.training_job_delete(job=_owned_job(request, job_id), user=request.auth)
    return Status(204, None)


@router.post(
    "/training/jobs/{job_id}/start", response={200: JobOut, **ERRORS}, auth=requires("run_jobs")
)
def jobs_start(request: HttpRequest, job_id: UUID, override_reason: str = ""):
    """Start a pending job. ``override_reason`` (admins) starts it over the budget."""
    services.training_job_start(
        job=_owned_job(request, job_id), user=request.auth, override_reason=override_reason[:500]
    )
    return _job(job_id, detail=True)


@router.post(
    "/training/jobs/{job_id}/cancel", response={200: JobOut, **ERRORS}, auth=requires("run_jobs")
)
def jobs_cancel(request: HttpRequest, job_id: UUID):
    services.training_job_cancel(job=_owned_job(request, job_id), user=request.auth)
    return _job(job_id, detail=True)


@router.post(
    "/training/jobs/{job_id}/retry", response={201: JobOut, **ERRORS}, auth=requires("run_jobs")
)
def jobs_retry(request: HttpRequest, job_id: UUID):
    retry = services.training_job_retry(job=_owned_job(request, job_id), user=request.auth)
    return Status(201, _job(retry.pk, detail=True))


@router.post(
    "/training/jobs/{job_id}/switch-to-on-demand",
    response={200: JobOut, **ERRORS},
    auth=requires("run_jobs"),
)
def jobs_switch_to_on_demand(request: HttpRequest, job_id: UUID):
    """Run a RunPod spot job on on-demand instances: at once when it waits for spot capacity,
    from its next relaunch when it runs; a job that failed for lack of spot capacity starts
    again as a new on-demand job, which is returned (its ``retry_of_id`` is this job)."""
    job = services.training_job_switch_to_on_demand(
        job=_owned_job(request, job_id), user=request.auth
    )
    return _job(job.pk, detail=True)


@router.get(
    "/training/jobs/{job_id}/metrics",
    response={200: list[MetricOut], **ERRORS},
    auth=requires("view_dashboard"),
)
def jobs_metrics(request: HttpRequest, job_id: UUID):
    return _job(job_id).metrics.all()


@router.get(
    "/training/jobs/{job_id}/events",
    response={200: list[EventOut], **ERRORS},
    auth=requires("view_dashboard"),
)
@paginate(PageNumberPagination, page_size=200)
def jobs_events(request: HttpRequest, job_id: UUID, type: str | None = None):
    events = WebhookEvent.objects.filter(job=_job(job_id))
    return events.filter(type=type) if type else events


@router.get(
    "/training/jobs/{job_id}/artifacts",
    response={200: list[ArtifactOut], **ERRORS},
    auth=requires("view_dashboard"),
)
def jobs_artifacts(request: HttpRequest, job_id: UUID):
    return _job(job_id).artifacts.all()


@router.get(
    "/training/jobs/{job_id}/logs", response={200: dict, **ERRORS}, auth=requires("view_dashboard")
)
def jobs_logs(request: HttpRequest, job_id: UUID, tail: int = Query(200, ge=1, le=5000)):
    job = _job(job_id)
    return {
        "job_id": str(job.pk),
        "logs": get_executor(job.executor).logs(job_id=str(job.pk), tail=tail),
    }


@router.get(
    "/training/jobs/{job_id}/download/adapters",
    response={200: None, 302: None, **ERRORS},
    auth=requires("view_dashboard"),
)
def download_adapters(request: HttpRequest, job_id: UUID) -> HttpResponse:
    return downloads.serve(request, downloads.adapter_zip(job=_job(job_id)))


@router.get(
    "/training/jobs/{job_id}/download/metrics",
    response={200: None, **ERRORS},
    auth=requires("view_dashboard"),
)
def download_metrics(
    request: HttpRequest, job_id: UUID, format: Literal["csv", "json"] = "csv"
) -> HttpResponse:
    return downloads.metrics_response(request, job=_job(job_id), fmt=format)


@router.get(
    "/training/jobs/{job_id}/download/deployment-package",
    response={200: None, 302: None, **ERRORS},
    auth=requires("view_dashboard"),
)
def download_deployment_package(request: HttpRequest, job_id: UUID) -> HttpResponse:
    return downloads.serve(request, downloads.deployment_package(job=_job(job_id)))


# --- Webhook ---------------------------------------------------------------------------------


class WebhookSignature(APIKeyHeader):
    """The worker's HMAC signature (gpu/PROTOCOL.md); checked with the body in the handler."""

    param_name = "X-Crucible-Signature"

    def authenticate(self, request: HttpRequest, key: str | None):
        # Size first (a 413 before any signature work or body parsing), then the signature
        # (in the handler, with the body), then the body.
        try:
            length = int(request.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
            raise RequestDataTooBig("Request body exceeded settings.DATA_UPLOAD_MAX_MEMORY_SIZE.")
        return key or None


@router.post(
    "/training/webhook",
    response={200: dict, **ERRORS},
    auth=WebhookSignature(),
    throttle=[],  # workers report every step; the HMAC is their credential
    summary="Worker events (HMAC-signed; see gpu/PROTOCOL.md)",
)
def webhook(request: HttpRequest):
    event, created = services.training_event_receive(
        body=request.body,
        timestamp=request.headers.get("X-Crucible-Timestamp", ""),
        signature=request.headers.get("X-Crucible-Signature", ""),
        event_id_header=request.headers.get("X-Crucible-Event-Id", ""),
    )
    return {"event_id": str(event.event_id), "status": "stored" if created else "duplicate"}
