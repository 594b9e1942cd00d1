"""Billing API: the cost estimate, the monthly budget, alerts, job costs and approvals."""

from __future__ import annotations

import json
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Literal
from uuid import UUID

from django.http import HttpRequest, HttpResponse
from ninja import Field, Query, Router, Schema

from billing import services
from billing.models import GpuPrice, NotificationPreference
from config.api_routes import ERRORS
from config.auth import requires
from config.errors import InvalidInput, NotFound

router = Router(tags=["billing"])


# --- Schemas ------------------------------------------------------------------------------------


class EstimateQuery(Schema):
    training_file_id: UUID
    base_model: str = "SmolLM2-135M-Instruct"
    preset: str | None = Field(None, description="Preset key; the default preset when omitted")
    overrides: str = Field("{}", description="Hyperparameter overrides as a JSON object")
    gpu_type: str = Field("", description="Catalog GPU type; the executor's default when empty")
    spot: bool = False
    executor: str = Field("runpod", pattern="^(local|runpod)$")


class Range(Schema):
    low: float
    point: float
    high: float


class EstimateOut(Schema):
    text: str
    gpu_type: str
    spot: bool
    duration_seconds: Range
    cost: Range
    cost_spot: Range
    cost_on_demand: Range
    rate_spot: float
    rate_on_demand: float
    train_tokens: int
    token_source: str
    steps: int
    tokens_processed: float
    seconds_per_step: float
    training_seconds: float
    phases: dict
    recovery_seconds: dict
    spread: float
    basis: str = Field(..., description="history (fitted on completed jobs) or prior")
    history_jobs: int
    model: dict = Field(
        default_factory=dict,
        description="The fitted coefficients and inputs (re-estimation while running uses them)",
    )


class BudgetJobOut(Schema):
    id: str
    name: str
    status: str
    created_by: str | None
    attribution: str
    gpu_type: str
    spot: bool
    spent: Decimal
    estimate: Decimal | None
    variance_pct: float | None
    remaining_estimate: Decimal
    override: bool
    capped: bool


class BudgetOut(Schema):
    month: str
    budget: Decimal
    spent: Decimal
    reserved: Decimal
    remaining: Decimal
    forecast: Decimal
    percent_used: float | None
    approval_threshold: Decimal
    hard_cap_percent: int
    alert_thresholds: list[dict]
    by_kind: dict
    jobs: list[BudgetJobOut]
    attribution: list[dict]
    daily: list[dict]
    active_jobs: list[dict]
    alerts: list[dict]


# YYYY-MM, stated in the schema (the service refused other shapes with a 422 it did not state).
MONTH_PATTERN = r"^[1-9][0-9]{3}-(0[1-9]|1[0-2])$"
Month = Annotated[str, Field(pattern=MONTH_PATTERN, description="YYYY-MM")]


class BudgetIn(Schema):
    amount: Decimal = Field(..., ge=0, max_digits=10, decimal_places=2)
    month: Month | None = Field(None, description="YYYY-MM; this month when omitted")
    approval_threshold: Decimal | None = Field(None, ge=0, max_digits=10, decimal_places=2)
    hard_cap_percent: int | None = Field(None, ge=1, le=1000)


class Threshold(Schema):
    percent: int = Field(..., ge=1, le=200)
    channels: list[Literal["email", "slack"]] = Field(default_factory=lambda: ["email"])


class ThresholdsIn(Schema):
    thresholds: list[Threshold] = Field(..., min_length=1, max_length=10)
    month: Month | None = None


class ThresholdsOut(Schema):
    month: str
    alert_thresholds: list[dict]


class JobCostOut(Schema):
    job_id: str
    status: str
    gpu_type: str = ""
    spot: bool = False
    rate_per_hour: Decimal = Decimal(0)
    held_seconds: float = 0
    accrued: Decimal
    accrued_at: datetime | None = None
    estimate: Decimal | None = None
    estimate_text: str = ""
    variance_pct: float | None = None
    warning: bool = False
    estimate_low: Decimal | None = None
    estimate_high: Decimal | None = None
    warning_percent: float = 20
    projection: dict | None = None
    projected_variance_pct: float | None = None
    projected_warning: bool = False
    reserved: Decimal = Decimal(0)
    approved: bool = False
    override_reason: str = ""
    capped_at: datetime | None = None


class ApproveIn(Schema):
    reason: str = Field("", max_length=500)


class PriceOut(Schema):
    gpu_type: str
    display_name: str
    spot_per_hour: Decimal
    on_demand_per_hour: Decimal
    source: str
    updated_at: datetime


class PreferencesIn(Schema):
    job_completed_email: bool | None = None
    job_failed_email: bool | None = None
    job_slack: bool | None = None


class PreferencesOut(Schema):
    job_completed_email: bool
    job_failed_email: bool
    job_slack: bool


# --- Routes -------------------------------------------------------------------------------------


@router.get(
    "/training/cost-estimate",
    response={200: EstimateOut, **ERRORS},
    auth=requires("view_dashboard"),
    summary="Duration and cost range of a configuration, before start",
)
def cost_estimate(request: HttpRequest, query: Query[EstimateQuery]):
    from corpora.models import TrainingFile
    from training.models import BaseModel, Preset

    try:
        overrides = json.loads(query.overrides or "{}")
    except ValueError as exc:
        raise InvalidInput("overrides must be a JSON object.") from exc
    if not isinstance(overrides, dict):
        raise InvalidInput("overrides must be a JSON object.")
    training_file = TrainingFile.objects.filter(pk=query.training_file_id).first()
    if training_file is None:
        raise NotFound(f"No training file {query.training_file_id}.")
    base_model = BaseModel.objects.filter(name=query.base_model, is_active=True).first()
    if base_model is None:
        raise InvalidInput(f"Unknown base model '{query.base_model}'.")
    if query.preset:
        preset = Preset.objects.filter(key=query.preset).first()
        if preset is None:
            raise InvalidInput(f"Unknown preset '{query.preset}'.")
    else:
        preset = Preset.objects.filter(is_default=True).first()
    est = services.cost_estimate(
        training_file=training_file,
        base_model=base_model,
        preset=preset,
        overrides=overrides,
        gpu_type=query.gpu_type,
        spot=query.spot,
        executor=query.executor,
    )
    return est.as_dict()


@router.get(
    "/billing/prices", response={200: list[PriceOut], **ERRORS}, auth=requires("view_dashboard")
)
def prices_list(request: HttpRequest):
    return GpuPrice.objects.filter(is_active=True)


@router.get(
    "/billing/budget/monthly",
    response={200: BudgetOut, **ERRORS},
    auth=requires("view_dashboard"),
    summary="Spent, remaining, forecast and per-job spending of a month",
)
def budget_monthly(request: HttpRequest, month: Month | None = None):
    return services.budget_summary(month=services.parse_month(month))


@router.post(
    "/billing/budget/monthly",
    response={200: BudgetOut, **ERRORS},
    auth=requires("manage_budgets"),
    summary="Set a month's budget (and approval threshold, hard cap)",
)
def budget_monthly_set(request: HttpRequest, payload: BudgetIn):
    month = services.parse_month(payload.month)
    services.budget_set(
        user=request.auth,
        amount=payload.amount,
        month=month,
        approval_threshold=payload.approval_threshold,
        hard_cap_percent=payload.hard_cap_percent,
    )
    return services.budget_summary(month=month)


@router.get(
    "/billing/budget/monthly.csv",
    auth=requires("view_dashboard"),
    summary="The month's ledger as CSV, for accounting",
)
def budget_monthly_csv(request: HttpRequest, month: Month | None = None):
    parsed: date = services.parse_month(month)
    response = HttpResponse(services.ledger_csv(month=parsed), content_type="text/csv")
    response["Content-Disposition"] = f'attachment; filename="crucible-spending-{parsed:%Y-%m}.csv"'
    return response


@router.post(
    "/billing/budget/alerts",
    response={200: ThresholdsOut, **ERRORS},
    auth=requires("manage_budgets"),
    summary="Configure the budget alert thresholds",
)
def budget_alerts_set(request: HttpRequest, payload: ThresholdsIn):
    month = services.parse_month(payload.month)
    budget = services.budget_thresholds_set(
        user=request.auth, thresholds=[t.dict() for t in payload.thresholds], month=month
    )
    return {"month": f"{budget.month:%Y-%m}", "alert_thresholds": budget.alert_thresholds}


@router.get(
    "/billing/jobs/{job_id}/cost",
    response={200: JobCostOut, **ERRORS},
    auth=requires("view_dashboard"),
    summary="Live cost of a job against its estimate",
)
def job_cost(request: HttpRequest, job_id: UUID):
    return services.job_cost_detail(job_id=job_id)


@router.post(
    "/billing/jobs/{job_id}/approve",
    response={200: JobCostOut, **ERRORS},
    auth=requires("override_budgets"),
    summary="Approve a job estimated over the approval threshold",
)
def job_approve(request: HttpRequest, job_id: UUID, payload: ApproveIn):
    from training.models import TrainingJob

    job = TrainingJob.objects.filter(pk=job_id).first()
    if job is None:
        raise NotFound(f"No training job {job_id}.")
    services.job_approve(job=job, user=request.auth, reason=payload.reason)
    return services.job_cost_detail(job_id=job_id)


@router.get(
    "/billing/notifications",
    response={200: PreferencesOut, **ERRORS},
    auth=requires("view_dashboard"),
    summary="My job notification preferences",
)
def preferences_get(request: HttpRequest):
    return NotificationPreference.objects.filter(user=request.auth).first() or (
        NotificationPreference(user=request.auth)
    )


@router.post(
    "/billing/notifications",
    response={200: PreferencesOut, **ERRORS},
    auth=requires("run_jobs"),
    summary="Set my job notification preferences",
)
def preferences_set(request: HttpRequest, payload: PreferencesIn):
    pref, _ = NotificationPreference.objects.get_or_create(user=request.auth)
    changes = {k: v for k, v in payload.dict().items() if v is not None}
    for key, value in changes.items():
        setattr(pref, key, value)
    if changes:
        pref.save(update_fields=list(changes))
    return pref
