"""Training tools API under /api/v1/training/: job templates, compare, playground."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from django.http import HttpRequest, HttpResponse
from ninja import Field, Query, Router, Schema
from ninja.responses import Status

from config.api_routes import ERRORS, Omittable
from config.auth import requires
from config.errors import InvalidInput, NotFound
from config.roles import require_change
from corpora.models import TrainingFile
from training import services
from training.api import JobOut, base_model_and_preset
from training.models import JobTemplate, PlaygroundRun, TrainingJob

router = Router(tags=["training tools"])


# --- Schemas --------------------------------------------------------------------------------


class TemplateOut(Schema):
    id: int
    name: str
    description: str
    notes: str
    tags: list[str]
    base_model: str = Field(..., alias="base_model.name")
    preset: str | None = Field(None, alias="preset.key")
    overrides: dict
    training_file_id: UUID | None
    executor: str
    gpu_type: str
    spot: bool
    source_job_id: UUID | None
    use_count: int
    last_used_at: datetime | None
    created_by: str | None = Field(None, alias="created_by.username")
    created_at: datetime


class TemplateIn(Schema):
    name: str = Field(..., min_length=1, max_length=200)
    description: str = Field("", max_length=5000)
    notes: str = Field("", max_length=5000)
    tags: list[str] = Field(default_factory=list, max_length=20)
    base_model: str = "SmolLM2-135M-Instruct"
    preset: str | None = None
    overrides: dict = Field(default_factory=dict)
    training_file_id: UUID | None = None
    executor: Literal["local", "runpod"] = "local"
    gpu_type: str = Field("", max_length=64)
    spot: bool = False


class TemplateFromJobIn(Schema):
    name: str = Field(..., min_length=1, max_length=200)
    description: str = Field("", max_length=5000)
    include_training_file: bool = True


class TemplatePatch(Schema):
    # Fields may be left out, not set to null (the columns are NOT NULL); training_file_id
    # null detaches the file.
    name: str = Omittable(min_length=1, max_length=200)
    description: str = Omittable(max_length=5000)
    notes: str = Omittable(max_length=5000)
    tags: list[str] = Omittable(max_length=20)
    training_file_id: UUID | None = None


class TemplateStartIn(Schema):
    training_file_id: UUID | None = Field(
        None, description="Required when the template names no training file"
    )
    name: str = Field("", max_length=255)
    start: bool = Field(True, description="Start at once (else the job stays pending)")
    override_reason: str = Field("", max_length=500)


class PlaygroundIn(Schema):
    job_id: UUID
    prompt: str = Field(..., max_length=20000)
    system_prompt: str = Field("", max_length=20000)
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.1
    seed: int = 42


class PlaygroundOut(Schema):
    id: UUID
    job_id: UUID
    status: str
    stage: str
    prompt: str
    system_prompt: str
    decoding: dict
    base_output: str
    adapter_output: str
    timings: dict
    token_counts: dict
    device: str
    error_message: str
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None


# --- Helpers -------------------------------------------------------------------------------


def _template(template_id: int) -> JobTemplate:
    template = (
        JobTemplate.objects.select_related("base_model", "preset", "created_by", "training_file")
        .filter(pk=template_id)
        .first()
    )
    if template is None:
        raise NotFound(f"No template {template_id}.", details={"id": template_id})
    return template


def _training_file(file_id: UUID | None) -> TrainingFile | None:
    if file_id is None:
        return None
    training_file = TrainingFile.objects.filter(pk=file_id).first()
    if training_file is None:
        raise InvalidInput(
            f"No training file {file_id}.",
            details={"fields": [{"field": "training_file_id", "message": "not found"}]},
        )
    return training_file


def _job(job_id: UUID) -> TrainingJob:
    job = TrainingJob.objects.for_list().filter(pk=job_id).first()
    if job is None:
        raise NotFound(f"No training job {job_id}.", details={"id": str(job_id)})
    return job


def _job_out(job: TrainingJob) -> TrainingJob:
    return (
        TrainingJob.objects.for_list().prefetch_related("transitions", "recoveries").get(pk=job.pk)
    )


# --- Templates -----------------------------------------------------------------------------


@router.get(
    "/training/templates",
    response={200: list[TemplateOut], **ERRORS},
    auth=requires("view_dashboard"),
)
def templates_list(request: HttpRequest):
    return JobTemplate.objects.select_related("base_model", "preset", "created_by")


@router.post(
    "/training/templates", response={201: TemplateOut, **ERRORS}, auth=requires("run_jobs")
)
def templates_create(request: HttpRequest, payload: TemplateIn):
    base_model, preset = base_model_and_preset(payload.base_model, payload.preset)
    template = services.job_template_create(
        user=request.auth,
        name=payload.name,
        base_model=base_model,
        preset=preset,
        overrides=payload.overrides,
        training_file=_training_file(payload.training_file_id),
        description=payload.description,
        notes=payload.notes,
        tags=payload.tags,
        executor=payload.executor,
        gpu_type=payload.gpu_type,
        spot=payload.spot,
    )
    return Status(201, _template(template.pk))


@router.post(
    "/training/jobs/{job_id}/save-template",
    response={201: TemplateOut, **ERRORS},
    auth=requires("run_jobs"),
)
def templates_from_job(request: HttpRequest, job_id: UUID, payload: TemplateFromJobIn):
    template = services.job_template_from_job(
        job=_job(job_id),
        user=request.auth,
        name=payload.name,
        description=payload.description,
        include_training_file=payload.include_training_file,
    )
    return Status(201, _template(template.pk))


@router.get(
    "/training/templates/{template_id}",
    response={200: TemplateOut, **ERRORS},
    auth=requires("view_dashboard"),
)
def templates_get(request: HttpRequest, template_id: int):
    return _template(template_id)


@router.patch(
    "/training/templates/{template_id}",
    response={200: TemplateOut, **ERRORS},
    auth=requires("run_jobs"),
)
def templates_update(request: HttpRequest, template_id: int, payload: TemplatePatch):
    template = _template(template_id)
    require_change(request.auth, template, "this template")
    changes = payload.dict(exclude_unset=True)
    if "training_file_id" in changes:
        changes["training_file"] = _training_file(changes.pop("training_file_id"))
    services.job_template_update(template=template, user=request.auth, **changes)
    return _template(template_id)


@router.delete(
    "/training/templates/{template_id}",
    response={204: None, **ERRORS},
    auth=requires("run_jobs"),
)
def templates_delete(request: HttpRequest, template_id: int):
    template = _template(template_id)
    require_change(request.auth, template, "this template")
    services.job_template_delete(template=template, user=request.auth)
    return Status(204, None)


@router.post(
    "/training/templates/{template_id}/start",
    response={201: JobOut, **ERRORS},
    auth=requires("run_jobs"),
)
def templates_start(request: HttpRequest, template_id: int, payload: TemplateStartIn):
    """A new job from the template, started at once unless ``start`` is false."""
    job = services.job_template_start(
        template=_template(template_id),
        user=request.auth,
        training_file=_training_file(payload.training_file_id),
        name=payload.name,
        start=payload.start,
        override_reason=payload.override_reason,
    )
    return Status(201, _job_out(job))


# --- Compare -------------------------------------------------------------------------------


class CompareQuery(Schema):
    jobs: list[UUID] = Field(..., description="2 to 4 job ids (repeat the parameter)")


@router.get("/training/compare", response={200: dict, **ERRORS}, auth=requires("view_dashboard"))
def compare(request: HttpRequest, query: Query[CompareQuery]):
    """Loss series, metrics (best of each marked) and hyperparameters of 2-4 jobs."""
    return services.training_jobs_compare(job_ids=query.jobs)


@router.get(
    "/training/compare/csv", response={200: None, **ERRORS}, auth=requires("view_dashboard")
)
def compare_csv(request: HttpRequest, query: Query[CompareQuery]) -> HttpResponse:
    comparison = services.training_jobs_compare(job_ids=query.jobs)
    response = HttpResponse(
        services.training_jobs_compare_csv(comparison=comparison),
        content_type="text/csv; charset=utf-8",
    )
    response["Content-Disposition"] = 'attachment; filename="training-comparison.csv"'
    return response


# --- Playground ----------------------------------------------------------------------------


@router.post(
    "/training/playground", response={202: PlaygroundOut, **ERRORS}, auth=requires("run_jobs")
)
def playground_create(request: HttpRequest, payload: PlaygroundIn):
    """Queue a prompt for the base model and the job's adapter; poll the run for answers."""
    run = services.playground_run_create(
        job=_job(payload.job_id),
        user=request.auth,
        prompt=payload.prompt,
        system_prompt=payload.system_prompt,
        max_new_tokens=payload.max_new_tokens,
        temperature=payload.temperature,
        top_p=payload.top_p,
        repetition_penalty=payload.repetition_penalty,
        seed=payload.seed,
    )
    return Status(202, run)


@router.get(
    "/training/playground/{run_id}",
    response={200: PlaygroundOut, **ERRORS},
    auth=requires("view_dashboard"),
)
def playground_get(request: HttpRequest, run_id: UUID):
    run = PlaygroundRun.objects.filter(pk=run_id).first()
    if run is None:
        raise NotFound(f"No playground run {run_id}.", details={"id": str(run_id)})
    return run
