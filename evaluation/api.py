"""Validation API under /api/v1/validation/ (runs, responses, scores, ratings, reports,
share links, approvals) and the job's report download."""

from datetime import datetime
from typing import Literal
from uuid import UUID

from django.http import FileResponse, HttpRequest, HttpResponse, HttpResponseRedirect
from ninja import Field, Query, Router, Schema
from ninja.pagination import paginate
from ninja.responses import Status

from config.api_routes import ERRORS, PageNumberPagination
from config.auth import requires
from config.errors import InvalidInput, NotFound
from config.storage import storage_file, storage_is_s3, storage_url
from evaluation import services
from evaluation.models import (
    Approval,
    GeneratedResponse,
    HumanRating,
    JudgeScore,
    RatingPair,
    Report,
    RunStatus,
    ShareLink,
    ValidationRun,
)
from training.models import TrainingJob

router = Router(tags=["validation"])
SIGNED_LINK_SECONDS = 600


# --- Schemas --------------------------------------------------------------------------------


class RunListOut(Schema):
    id: UUID
    job_id: UUID
    job_name: str = Field(..., alias="job.name")
    status: str
    progress: float
    stage: str
    stage_detail: str
    trigger: str
    evaluator_version: str
    created_by: str | None = Field(None, alias="created_by.username")
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    error_type: str
    error_message: str
    attempts: int = Field(..., description="Times a worker started it (1 + restarts)")
    heartbeat_at: datetime | None


class RunOut(RunListOut):
    suites: dict
    base_model: str
    adapter_uri: str
    decoding: dict
    seeds: dict
    metrics: dict
    examples: list[dict]


class RunIn(Schema):
    job_id: UUID


class ResponseOut(Schema):
    id: int
    suite: str
    item_id: str
    category: str
    side: str
    prompt: str
    text: str
    stopped: bool
    new_tokens: int
    seconds: float


class JudgeScoreOut(Schema):
    suite: str = Field(..., alias="response.suite")
    item_id: str = Field(..., alias="response.item_id")
    side: str = Field(..., alias="response.side")
    judge: str
    scores: dict
    created_at: datetime


class DimensionOut(Schema):
    key: str
    name: str
    description: str
    anchors: dict


class RatingItemOut(Schema):
    """A blind item: which response is the base model's is never sent."""

    pair_id: UUID
    suite: str
    suite_name: str
    prompt: str
    context: str = Field("", description="A note for raters (never shown to the models)")
    left: str
    right: str
    dimensions: list[DimensionOut]
    progress: dict


class RatingIn(Schema):
    left_scores: dict[str, int]
    right_scores: dict[str, int]
    comment: str = Field("", max_length=2000)


class RatingOut(Schema):
    id: int
    suite: str
    item_id: str
    rater: str = Field(..., alias="rater.username")
    baseline_scores: dict
    trained_scores: dict
    comment: str
    created_at: datetime


class ReportOut(Schema):
    id: int
    run_id: UUID
    version: int
    sha256: str
    size_bytes: int
    metrics: dict
    created_at: datetime
    download_count: int


class ShareLinkOut(Schema):
    id: int
    report_id: int
    token: str
    url: str
    state: str
    expires_at: datetime
    revoked_at: datetime | None
    created_at: datetime
    download_count: int

    @staticmethod
    def resolve_url(obj: ShareLink) -> str:
        from django.urls import reverse

        return reverse("evaluation:shared", args=[obj.token])


class ApprovalIn(Schema):
    decision: Literal["approved", "rejected"]
    reason: str = Field(..., max_length=2000)


class ApprovalOut(Schema):
    id: int
    run_id: UUID
    job_id: UUID
    decision: str
    reason: str
    decided_by: str | None = Field(None, alias="decided_by.username")
    decided_at: datetime


class RunFilters(Schema):
    status: list[RunStatus] | None = None
    job_id: UUID | None = None
    q: str | None = Field(None, description="Search in job names")


# --- Helpers -------------------------------------------------------------------------------


def _run(run_id: UUID) -> ValidationRun:
    run = ValidationRun.objects.for_list().filter(pk=run_id).first()
    if run is None:
        raise NotFound(f"No validation run {run_id}.", details={"id": str(run_id)})
    return run


def _report(report_id: int) -> Report:
    report = Report.objects.select_related("run").filter(pk=report_id).first()
    if report is None:
        raise NotFound(f"No report {report_id}.", details={"id": report_id})
    return report


def serve_report(report: Report) -> HttpResponse:
    """The PDF: a pre-signed link on S3, streamed from local disk."""
    if storage_is_s3():
        return HttpResponseRedirect(storage_url(report.storage_path, expires=SIGNED_LINK_SECONDS))
    response = FileResponse(
        storage_file(report.storage_path),
        as_attachment=True,
        filename=report.filename,
        content_type="application/pdf",
    )
    return response


# --- Runs ----------------------------------------------------------------------------------


@router.get(
    "/validation/runs", response={200: list[RunListOut], **ERRORS}, auth=requires("view_dashboard")
)
@paginate(PageNumberPagination)
def runs_list(request: HttpRequest, filters: Query[RunFilters]):
    runs = ValidationRun.objects.for_list()
    if filters.status:
        runs = runs.filter(status__in=filters.status)
    if filters.job_id:
        runs = runs.filter(job_id=filters.job_id)
    if filters.q:
        runs = runs.filter(job__name__icontains=filters.q)
    return runs.order_by("-created_at", "-id")


@router.post("/validation/runs", response={201: RunOut, **ERRORS}, auth=requires("run_jobs"))
def runs_create(request: HttpRequest, payload: RunIn):
    """Start a validation of a completed training job (runs in the background)."""
    job = TrainingJob.objects.filter(pk=payload.job_id).first()
    if job is None:
        raise InvalidInput(
            f"No training job {payload.job_id}.",
            details={"fields": [{"field": "job_id", "message": "not found"}]},
        )
    run = services.validation_run_create(job=job, user=request.auth)
    return Status(201, _run(run.pk))


@router.get(
    "/validation/runs/{run_id}", response={200: RunOut, **ERRORS}, auth=requires("view_dashboard")
)
def runs_get(request: HttpRequest, run_id: UUID):
    return _run(run_id)


@router.post(
    "/validation/runs/{run_id}/cancel",
    response={200: RunOut, **ERRORS},
    auth=requires("run_jobs"),
)
def runs_cancel(request: HttpRequest, run_id: UUID):
    """Cancel a pending or running validation; a running one stops within a few seconds."""
    services.validation_run_cancel(run=_run(run_id), user=request.auth)
    return _run(run_id)


@router.get(
    "/validation/runs/{run_id}/responses",
    response={200: list[ResponseOut], **ERRORS},
    auth=requires("view_dashboard"),
)
@paginate(PageNumberPagination, page_size=200)
def runs_responses(
    request: HttpRequest,
    run_id: UUID,
    suite: Literal["emotional_intelligence", "brand_voice"] | None = None,
):
    responses = GeneratedResponse.objects.filter(run=_run(run_id))
    return responses.filter(suite=suite) if suite else responses


@router.get(
    "/validation/runs/{run_id}/judge-scores",
    response={200: list[JudgeScoreOut], **ERRORS},
    auth=requires("view_dashboard"),
)
@paginate(PageNumberPagination, page_size=200)
def runs_judge_scores(request: HttpRequest, run_id: UUID):
    return (
        JudgeScore.objects.filter(response__run=_run(run_id))
        .select_related("response")
        .order_by("response__suite", "response__item_id", "response__side")
    )


# --- Blind rating --------------------------------------------------------------------------


@router.get(
    "/validation/runs/{run_id}/rating-items/next",
    response={200: RatingItemOut, 204: None, **ERRORS},
    auth=requires("score_validations"),
)
def rating_next(
    request: HttpRequest,
    run_id: UUID,
    suite: Literal["emotional_intelligence", "brand_voice"] | None = None,
):
    """The next blind item for the caller ("left"/"right" only); 204 when all are rated."""
    run = _run(run_id)
    pair = services.rating_pair_next(run=run, rater=request.auth, suite=suite)
    if pair is None:
        return Status(204, None)
    return {
        **services.rating_pair_view(pair=pair),
        "progress": services.rating_progress(run=run, rater=request.auth),
    }


@router.post(
    "/validation/rating-items/{pair_id}/rating",
    response={201: dict, **ERRORS},
    auth=requires("score_validations"),
)
def rating_create(request: HttpRequest, pair_id: UUID, payload: RatingIn):
    pair = RatingPair.objects.filter(pk=pair_id, rater=request.auth).first()
    if pair is None:
        raise NotFound(f"No rating item {pair_id} for you.", details={"id": str(pair_id)})
    services.rating_submit(
        pair=pair,
        rater=request.auth,
        left_scores=payload.left_scores,
        right_scores=payload.right_scores,
        comment=payload.comment,
    )
    run = pair.run
    return Status(201, {"progress": services.rating_progress(run=run, rater=request.auth)})


@router.get(
    "/validation/runs/{run_id}/ratings",
    response={200: list[RatingOut], **ERRORS},
    auth=requires("view_dashboard"),
)
@paginate(PageNumberPagination, page_size=200)
def runs_ratings(request: HttpRequest, run_id: UUID):
    """Submitted ratings, mapped back to the sides (for analysis after rating)."""
    return HumanRating.objects.filter(run=_run(run_id)).select_related("rater")


# --- Reports and share links ---------------------------------------------------------------


@router.get(
    "/validation/runs/{run_id}/reports",
    response={200: list[ReportOut], **ERRORS},
    auth=requires("view_dashboard"),
)
def runs_reports(request: HttpRequest, run_id: UUID):
    return Report.objects.filter(run=_run(run_id))


@router.post(
    "/validation/runs/{run_id}/reports",
    response={201: ReportOut, **ERRORS},
    auth=requires("score_validations"),
)
def runs_reports_create(request: HttpRequest, run_id: UUID):
    """Recompute the figures with the ratings so far and render a new report version."""
    report = services.validation_report_generate(run=_run(run_id), user=request.auth)
    return Status(201, report)


@router.get(
    "/validation/reports/{report_id}/download",
    response={200: None, 302: None, **ERRORS},
    auth=requires("view_dashboard"),
)
def reports_download(request: HttpRequest, report_id: int) -> HttpResponse:
    return serve_report(_report(report_id))


@router.get(
    "/training/jobs/{job_id}/download/validation-report",
    response={200: None, 302: None, **ERRORS},
    auth=requires("view_dashboard"),
)
def job_validation_report_download(request: HttpRequest, job_id: UUID) -> HttpResponse:
    """The newest validation report of the job."""
    job = TrainingJob.objects.filter(pk=job_id).first()
    if job is None:
        raise NotFound(f"No training job {job_id}.", details={"id": str(job_id)})
    return serve_report(services.job_validation_report(job=job))


@router.get(
    "/validation/reports/{report_id}/share-links",
    response={200: list[ShareLinkOut], **ERRORS},
    auth=requires("score_validations"),
)
def share_links_list(request: HttpRequest, report_id: int):
    return _report(report_id).share_links.all()


@router.post(
    "/validation/reports/{report_id}/share-links",
    response={201: ShareLinkOut, **ERRORS},
    auth=requires("score_validations"),
)
def share_links_create(request: HttpRequest, report_id: int):
    """A link anyone can open without signing in, for 30 days or until revoked."""
    return Status(201, services.share_link_create(report=_report(report_id), user=request.auth))


@router.post(
    "/validation/share-links/{link_id}/revoke",
    response={200: ShareLinkOut, **ERRORS},
    auth=requires("score_validations"),
)
def share_links_revoke(request: HttpRequest, link_id: int):
    link = ShareLink.objects.filter(pk=link_id).first()
    if link is None:
        raise NotFound(f"No share link {link_id}.", details={"id": link_id})
    return services.share_link_revoke(link=link, user=request.auth)


# --- Approval ------------------------------------------------------------------------------


@router.get(
    "/validation/runs/{run_id}/approvals",
    response={200: list[ApprovalOut], **ERRORS},
    auth=requires("view_dashboard"),
)
def approvals_list(request: HttpRequest, run_id: UUID):
    """Every decision on the job's model, newest first (the first is the one in force)."""
    run = _run(run_id)
    return Approval.objects.filter(job_id=run.job_id).select_related("decided_by")


@router.post(
    "/validation/runs/{run_id}/approvals",
    response={201: ApprovalOut, **ERRORS},
    auth=requires("approve_validations"),
)
def approvals_create(request: HttpRequest, run_id: UUID, payload: ApprovalIn):
    approval = services.approval_decide(
        run=_run(run_id), user=request.auth, decision=payload.decision, reason=payload.reason
    )
    return Status(201, approval)
