"""Billing workflows: prices, estimates, budgets, enforcement, live cost, alerts, the ledger."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import defaultdict
from collections.abc import Callable
from datetime import date, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractUser
from django.contrib.contenttypes.models import ContentType
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, Q, Sum
from django.utils import timezone

from billing import conf
from billing.estimates import Estimate, estimate, held_intervals, money, reestimate_running
from billing.models import (
    AuditEntry,
    BudgetAlert,
    GpuPrice,
    JobCost,
    LedgerEntry,
    LlmCall,
    LlmReservation,
    MonthlyBudget,
)
from billing.signals import llm_call_settled
from config.auth import has_capability
from config.errors import Conflict, InvalidInput, NotFound, PermissionDenied

logger = logging.getLogger("crucible.billing")

CENT = Decimal("0.01")
MICRO = Decimal("0.000001")
NANO = Decimal("0.00000001")
LLM_IN_FLIGHT = "in_flight"  # a write-ahead ledger row: the call left, its outcome unknown yet


class BudgetExceeded(Conflict):
    """A start or a call refused because it would take the month over its budget."""

    code = "budget_exceeded"
    default_message = "This would take the month over its budget."


# --- Months -------------------------------------------------------------------------------------


def month_start(value: date | datetime | None = None) -> date:
    if value is None:
        value = timezone.now()
    if isinstance(value, datetime):
        value = timezone.localtime(value).date()
    return value.replace(day=1)


def parse_month(value: str | None) -> date:
    """'2026-11' (or None for this month) -> date(2026, 11, 1)."""
    if not value:
        return month_start()
    try:
        year, month = value.split("-")[:2]
        return date(int(year), int(month), 1)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"month must look like 2026-11, not {value!r}.") from exc


# --- Prices -------------------------------------------------------------------------------------


def gpu_type_resolve(*, gpu_type: str, executor: str) -> str:
    if gpu_type:
        return gpu_type
    return conf.local_gpu_type() if executor == "local" else conf.runpod_gpu_type()


def gpu_price_get(*, gpu_type: str, executor: str = "runpod") -> GpuPrice:
    resolved = gpu_type_resolve(gpu_type=gpu_type, executor=executor)
    price = GpuPrice.objects.filter(gpu_type=resolved, is_active=True).first()
    if price is None:
        known = list(GpuPrice.objects.filter(is_active=True).values_list("gpu_type", flat=True))
        raise InvalidInput(
            f"No price for GPU type '{resolved}'. Known types: {', '.join(known)}; "
            "an admin can add one to the price catalog.",
            details={"gpu_type": resolved, "known": known},
        )
    return price


def gpu_prices_refresh(*, user: AbstractUser | None = None) -> int:
    """Update the catalog from RunPod's prices; returns how many prices changed.

    Prices come from ``training.executors.runpod.gpu_prices()``. Without a RunPod key it
    changes nothing and returns 0: the catalog keeps the seeded and admin-edited prices.
    """
    if not getattr(settings, "RUNPOD_API_KEY", ""):
        return 0
    from training.executors.runpod import gpu_prices  # billing is read by training: no cycle

    changed = 0
    now = timezone.now()
    for row in gpu_prices():
        spot, demand = Decimal(str(row["spot_per_hour"])), Decimal(str(row["on_demand_per_hour"]))
        price, created = GpuPrice.objects.get_or_create(
            gpu_type=row["gpu_type"],
            defaults={
                "display_name": row.get("display_name") or row["gpu_type"],
                "spot_per_hour": spot,
                "on_demand_per_hour": demand,
                "source": "RunPod API",
                "updated_at": now,
            },
        )
        if created or (price.spot_per_hour, price.on_demand_per_hour) != (spot, demand):
            GpuPrice.objects.filter(pk=price.pk).update(
                spot_per_hour=spot, on_demand_per_hour=demand, source="RunPod API", updated_at=now
            )
            changed += 1
    AuditEntry.objects.create(
        action=AuditEntry.Action.PRICES_REFRESHED, user=user, details={"changed": changed}
    )
    return changed


# --- Estimates ----------------------------------------------------------------------------------


def cost_estimate(
    *,
    training_file,
    base_model,
    preset=None,
    overrides: dict | None = None,
    gpu_type: str = "",
    spot: bool = False,
    executor: str = "runpod",
) -> Estimate:
    from training.config import resolve_configuration

    if not training_file.is_ready:
        raise InvalidInput(f"Training file '{training_file.name}' has problems.")
    configuration = resolve_configuration(
        preset_hyperparameters=preset.hyperparameters if preset else {},
        overrides=overrides,
        context_length=base_model.context_length,
    )
    price = gpu_price_get(gpu_type=gpu_type, executor=executor)
    return estimate(
        training_file=training_file,
        base_model=base_model,
        configuration=configuration,
        price=price,
        spot=spot,
        executor=executor,
        preset_id=preset.pk if preset else None,
    )


def job_estimate(*, job) -> Estimate:
    price = gpu_price_get(gpu_type=job.gpu_type, executor=job.executor)
    return estimate(
        training_file=job.training_file,
        base_model=job.base_model,
        configuration=job.configuration,
        price=price,
        spot=job.spot,
        executor=job.executor,
        preset_id=job.preset_id,
    )


def job_cost_record(*, job, est: Estimate | None = None) -> JobCost:
    """Create or refresh the job's billing row (rate from the catalog, the estimate)."""
    if est is None:
        est = job_estimate(job=job)
    rate = Decimal(str(est.rate_spot if job.spot else est.rate_on_demand))
    cost, _ = JobCost.objects.update_or_create(
        job=job,
        defaults={
            "gpu_type": est.gpu_type,
            "spot": job.spot,
            "rate_per_hour": rate,
            "estimate": est.as_dict(),
            "estimate_cost": est.point_cost,
        },
    )
    return cost


def _job_cost(job) -> JobCost:
    cost = JobCost.objects.filter(job=job).first()
    if cost is not None:
        return cost
    try:
        return job_cost_record(job=job)
    except InvalidInput:
        return JobCost.objects.create(job=job, gpu_type=job.gpu_type or "", spot=job.spot)


# --- Budgets ------------------------------------------------------------------------------------


def budget_get(*, month: date | None = None) -> MonthlyBudget:
    """The month's budget; a month without one inherits the latest earlier one (unsaved)."""
    month = month or month_start()
    found = MonthlyBudget.objects.filter(month__lte=month).order_by("-month").first()
    if found is not None and found.month == month:
        return found
    if found is not None:
        return MonthlyBudget(
            month=month,
            amount=found.amount,
            approval_threshold=found.approval_threshold,
            alert_thresholds=found.alert_thresholds,
            hard_cap_percent=found.hard_cap_percent,
        )
    return MonthlyBudget(
        month=month,
        amount=conf.monthly_budget(),
        approval_threshold=conf.approval_threshold(),
        alert_thresholds=conf.alert_thresholds(),
        hard_cap_percent=conf.hard_cap_percent(),
    )


def _budget_locked(month: date) -> MonthlyBudget:
    """The month's row, created from the inherited values if needed, locked for update."""
    template = budget_get(month=month)
    if template.pk is None:
        try:
            with transaction.atomic():
                template.save()
        except IntegrityError:
            pass
    return MonthlyBudget.objects.select_for_update().get(month=month)


def budget_set(
    *,
    user: AbstractUser | None,
    amount: Decimal,
    month: date | None = None,
    approval_threshold: Decimal | None = None,
    hard_cap_percent: int | None = None,
) -> MonthlyBudget:
    if amount < 0:
        raise InvalidInput("The budget cannot be negative.")
    if approval_threshold is not None and approval_threshold < 0:
        raise InvalidInput("The approval threshold cannot be negative.")
    if hard_cap_percent is not None and not 1 <= hard_cap_percent <= 1000:
        raise InvalidInput("hard_cap_percent must be between 1 and 1000.")
    month = month or month_start()
    with transaction.atomic():
        budget = _budget_locked(month)
        before = {
            "amount": str(budget.amount),
            "approval_threshold": str(budget.approval_threshold),
        }
        budget.amount = amount
        if approval_threshold is not None:
            budget.approval_threshold = approval_threshold
        if hard_cap_percent is not None:
            budget.hard_cap_percent = hard_cap_percent
        budget.updated_by = user
        budget.save()
        AuditEntry.objects.create(
            action=AuditEntry.Action.BUDGET_SET,
            user=user,
            details={
                "month": f"{month:%Y-%m}",
                "before": before,
                "after": {
                    "amount": str(budget.amount),
                    "approval_threshold": str(budget.approval_threshold),
                    "hard_cap_percent": budget.hard_cap_percent,
                },
            },
        )
    return budget


def budget_thresholds_set(
    *, user: AbstractUser | None, thresholds: list[dict], month: date | None = None
) -> MonthlyBudget:
    clean, seen = [], set()
    for item in thresholds:
        percent = item.get("percent")
        channels = sorted(set(item.get("channels") or ["email"]))
        if not isinstance(percent, int) or not 1 <= percent <= 200:
            raise InvalidInput(f"Each threshold percent must be an integer 1-200, not {percent!r}.")
        if percent in seen:
            raise InvalidInput(f"Threshold {percent}% is listed twice.")
        if not set(channels) <= {"email", "slack"}:
            raise InvalidInput(f"Unknown channels {channels}; use email and/or slack.")
        seen.add(percent)
        clean.append({"percent": percent, "channels": channels})
    if not clean:
        raise InvalidInput("Give at least one threshold.")
    month = month or month_start()
    with transaction.atomic():
        budget = _budget_locked(month)
        before = budget.alert_thresholds
        budget.alert_thresholds = sorted(clean, key=lambda t: t["percent"])
        budget.updated_by = user
        budget.save()
        AuditEntry.objects.create(
            action=AuditEntry.Action.THRESHOLDS_SET,
            user=user,
            details={"month": f"{month:%Y-%m}", "before": before, "after": budget.alert_thresholds},
        )
    return budget


def llm_month_spent(*, month: date) -> Decimal:
    """The cost of the month's model-gateway calls (exact, not rounded)."""
    return LlmCall.objects.filter(month=month).aggregate(s=Sum("cost"))["s"] or Decimal(0)


def month_spent(*, month: date) -> Decimal:
    """GPU time and old-style LLM ledger entries plus the model gateway's calls."""
    total = LedgerEntry.objects.filter(month=month).aggregate(s=Sum("amount"))["s"] or 0
    return money(total + llm_month_spent(month=month))


def _active_costs(*, exclude_job_id=None) -> list[JobCost]:
    from training.models import ACTIVE_STATUSES

    costs = JobCost.objects.filter(job__status__in=ACTIVE_STATUSES).select_related(
        "job", "job__created_by"
    )
    if exclude_job_id is not None:
        costs = costs.exclude(job_id=exclude_job_id)
    return list(costs)


def _remaining(cost: JobCost) -> Decimal:
    """What an active job is still expected to spend (its reservation not yet accrued)."""
    final = cost.projection.get("final_cost") if cost.projection else None
    expected = Decimal(str(final)) if final is not None else (cost.estimate_cost or cost.reserved)
    return max(Decimal(0), money(expected - cost.accrued))


def attribution_of(tags: list[str]) -> str:
    for tag in tags or []:
        if tag.startswith(conf.attribution_prefixes()):
            return tag
    return (tags or [""])[0]


def budget_summary(*, month: date | None = None) -> dict:
    """Spent, reserved, remaining, forecast, per-job and per-attribution figures of a month."""
    from training.models import TrainingJob

    month = month or month_start()
    budget = budget_get(month=month)
    entries = LedgerEntry.objects.filter(month=month)
    llm_total = llm_month_spent(month=month)
    spent = money((entries.aggregate(s=Sum("amount"))["s"] or 0) + llm_total)
    by_kind = {
        row["kind"]: money(row["s"])
        for row in entries.values("kind").annotate(s=Sum("amount")).order_by()
    }
    if llm_total:
        by_kind["llm_calls"] = money(llm_total)
    by_subject = list(
        entries.values("content_type", "object_id", "attribution")
        .annotate(s=Sum("amount"), q=Sum("quantity"))
        .order_by("-s")
    )
    by_day: dict = defaultdict(Decimal)
    for row in entries.values("day").annotate(s=Sum("amount")).order_by("day"):
        by_day[row["day"]] += row["s"]
    for row in LlmCall.objects.filter(month=month).values("day").annotate(s=Sum("cost")).order_by():
        by_day[row["day"]] += row["s"]
    by_day = {day: money(by_day[day]) for day in sorted(by_day)}
    is_current = month == month_start()
    active = _active_costs() if is_current else []
    remaining_active = sum((_remaining(c) for c in active), Decimal(0))
    job_ids = {row["object_id"] for row in by_subject if row["object_id"]} | {
        str(c.job_id) for c in active
    }
    jobs = {
        str(j.pk): j
        for j in TrainingJob.objects.filter(pk__in=job_ids).select_related("created_by", "billing")
    }
    spent_by_job = defaultdict(Decimal)
    attribution = defaultdict(Decimal)
    for row in by_subject:
        spent_by_job[row["object_id"]] += row["s"]
        attribution[row["attribution"] or "unattributed"] += row["s"]
    rows = []
    for job_id in sorted(job_ids, key=lambda j: -spent_by_job.get(j, 0)):
        job = jobs.get(job_id)
        if job is None:
            continue
        cost = getattr(job, "billing", None)
        rows.append(
            {
                "id": job_id,
                "name": job.name,
                "status": job.status,
                "created_by": job.created_by.username if job.created_by else None,
                "attribution": attribution_of(job.tags) or "unattributed",
                "gpu_type": cost.gpu_type if cost else job.gpu_type,
                "spot": job.spot,
                "spent": money(spent_by_job.get(job_id, 0)),
                "estimate": cost.estimate_cost if cost else None,
                "variance_pct": cost.variance_pct if cost else None,
                "remaining_estimate": _remaining(cost) if cost and job.is_active else Decimal(0),
                "override": bool(cost and cost.overridden_at),
                "capped": bool(cost and cost.capped_at),
            }
        )
    cumulative, running = [], Decimal(0)
    for day, amount in by_day.items():
        running += amount
        cumulative.append({"day": day.isoformat(), "amount": amount, "cumulative": running})
    amount = budget.amount
    return {
        "month": f"{month:%Y-%m}",
        "budget": amount,
        "spent": spent,
        "reserved": money(remaining_active),
        "remaining": money(amount - spent),
        "forecast": money(spent + remaining_active),
        "percent_used": round(float(spent / amount * 100), 1) if amount else None,
        "approval_threshold": budget.approval_threshold,
        "hard_cap_percent": budget.hard_cap_percent,
        "alert_thresholds": budget.alert_thresholds,
        "by_kind": by_kind,
        "llm_reserved": llm_reserved(month=month),
        "jobs": rows,
        "attribution": [
            {"attribution": k, "spent": money(v)}
            for k, v in sorted(attribution.items(), key=lambda kv: -kv[1])
        ],
        "daily": cumulative,
        "active_jobs": [
            {"id": str(c.job_id), "name": c.job.name, "status": c.job.status} for c in active
        ],
        "alerts": [
            {"threshold": a.threshold, "sent_at": a.sent_at, "channels": a.channels}
            for a in BudgetAlert.objects.filter(month=month).order_by("threshold")
        ],
    }


# --- Enforcement at start ------------------------------------------------------------------------


def job_start_check(*, job, user: AbstractUser | None, override_reason: str = "") -> JobCost:
    """Refuse (409) a start over budget or over the approval threshold; else reserve.

    Runs inside training_job_start's transaction: a refusal writes nothing.
    """
    override_reason = (override_reason or "").strip()
    can_override = has_capability(user, "override_budgets")
    month = month_start()
    budget = _budget_locked(month)  # serialises concurrent starts
    try:
        est = job_estimate(job=job)
    except InvalidInput as exc:
        raise Conflict(exc.message, details=exc.details, code="no_price") from exc
    cost = job_cost_record(job=job, est=est)
    amount = est.point_cost
    now = timezone.now()

    if amount > budget.approval_threshold and cost.approved_at is None:
        if not can_override:
            raise Conflict(
                f"This job is estimated at ${amount}, over the ${budget.approval_threshold} "
                "that needs an admin's approval. Ask an admin to approve it "
                f"(POST /api/v1/billing/jobs/{job.pk}/approve), then start it again.",
                code="approval_required",
                details={"estimate": amount, "approval_threshold": budget.approval_threshold},
            )
        cost.approved_by, cost.approved_at = user, now
        AuditEntry.objects.create(
            action=AuditEntry.Action.APPROVAL,
            job=job,
            user=user,
            reason=override_reason or "started by an admin",
            details={"estimate": str(amount), "approval_threshold": str(budget.approval_threshold)},
        )

    spent = month_spent(month=month)
    reserved = money(sum((_remaining(c) for c in _active_costs(exclude_job_id=job.pk)), Decimal(0)))
    details = {
        "month": f"{month:%Y-%m}",
        "spent": spent,
        "reserved": reserved,
        "estimate": amount,
        "budget": budget.amount,
        "remaining": money(budget.amount - spent - reserved),
    }
    if amount > 0 and spent + reserved + amount > budget.amount:
        if not override_reason:
            raise BudgetExceeded(
                f"Starting this job would take {month:%B %Y} over its budget: spent "
                f"${spent}, reserved ${reserved} by active jobs, this job's estimate ${amount}, "
                f"budget ${budget.amount}. An admin can start it anyway with an override reason.",
                code="budget_exceeded",
                details=details,
            )
        if not can_override:
            raise PermissionDenied(
                "Only an admin may start a job over the budget.",
                details={**details, "required_permission": "override_budgets"},
            )
        cost.override_by, cost.override_reason, cost.overridden_at = user, override_reason, now
        AuditEntry.objects.create(
            action=AuditEntry.Action.OVERRIDE,
            job=job,
            user=user,
            reason=override_reason[:500],
            details={k: str(v) for k, v in details.items()},
        )
        logger.warning("budget override for job %s by %s: %s", job.pk, user, override_reason)
    cost.reserved, cost.reserved_month = amount, month
    cost.save()
    if job.cost_estimate != amount:
        type(job).objects.filter(pk=job.pk).update(cost_estimate=amount)
        job.cost_estimate = amount
    return cost


def job_approve(*, job, user: AbstractUser, reason: str = "") -> JobCost:
    if job.status != "pending":
        raise Conflict("Only a job that has not started can be approved.")
    try:
        cost = job_cost_record(job=job)
    except InvalidInput as exc:
        raise Conflict(exc.message, details=exc.details, code="no_price") from exc
    with transaction.atomic():
        cost.approved_by, cost.approved_at = user, timezone.now()
        cost.save(update_fields=["approved_by", "approved_at"])
        AuditEntry.objects.create(
            action=AuditEntry.Action.APPROVAL,
            job=job,
            user=user,
            reason=reason[:500],
            details={"estimate": str(cost.estimate_cost)},
        )
    return cost


# --- Live cost -------------------------------------------------------------------------------


def _split_by_day(intervals) -> dict[date, float]:
    out: dict[date, float] = defaultdict(float)
    for start, end in intervals:
        current = start
        while current < end:
            local = timezone.localtime(current)
            midnight = local.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
            stop = min(end, midnight)
            out[local.date()] += (stop - current).total_seconds()
            current = stop
    return out


def _held_until(job, now: datetime) -> datetime:
    if not job.is_terminal:
        return now
    end = job.completed_at or now
    if job.status == "cancelled" and job.last_event_at and job.executor_ref:
        # The worker saves a checkpoint after SIGTERM; its last event says when it stopped.
        grace = timedelta(seconds=getattr(settings, "TRAINING_CANCEL_GRACE_S", 120))
        end = max(end, min(job.last_event_at, end + grace))
    return end


def job_cost_accrue(*, job, now: datetime, cost: JobCost | None = None) -> JobCost:
    """Recompute the job's GPU spend from its stored transition times, into the ledger."""
    from training.models import TrainingJob

    cost = cost or _job_cost(job)
    transitions = list(job.transitions.all())
    intervals = held_intervals(transitions, now=_held_until(job, now))
    per_day = _split_by_day(intervals)
    per_second = cost.rate_per_hour / Decimal(3600)
    ct = ContentType.objects.get_for_model(TrainingJob)
    existing = {
        e.day: e
        for e in LedgerEntry.objects.filter(
            kind=LedgerEntry.Kind.GPU_TIME, content_type=ct, object_id=str(job.pk)
        )
    }
    attribution = attribution_of(job.tags)
    total = Decimal(0)
    for day, seconds in per_day.items():
        quantity = Decimal(str(round(seconds, 3)))
        amount = (quantity * per_second).quantize(MICRO)
        total += amount
        entry = existing.get(day)
        if entry is None:
            LedgerEntry.objects.create(
                kind=LedgerEntry.Kind.GPU_TIME,
                day=day,
                month=day.replace(day=1),
                amount=amount,
                quantity=quantity,
                unit="gpu_second",
                rate=per_second.quantize(Decimal("0.0000000001")),
                content_type=ct,
                object_id=str(job.pk),
                attribution=attribution,
                description=f"{job.name} on {cost.gpu_type}{' (spot)' if cost.spot else ''}",
            )
        elif entry.amount != amount or entry.quantity != quantity:
            LedgerEntry.objects.filter(pk=entry.pk).update(
                amount=amount, quantity=quantity, updated_at=now
            )
    cost.accrued = total.quantize(Decimal("0.0001"))
    cost.held_seconds = sum(per_day.values())
    cost.accrued_at = now
    if job.status == "training":
        last_point = job.metrics.order_by("-step").first()
        projection = reestimate_running(
            job=job,
            transitions=transitions,
            last_point=last_point,
            rate_per_hour=float(cost.rate_per_hour),
            accrued=float(cost.accrued),
            now=now,
            estimate=cost.estimate,
        )
        if projection:
            cost.projection = projection
            TrainingJob.objects.filter(pk=job.pk).update(eta_seconds=projection["seconds_left"])
    cost.save(update_fields=["accrued", "held_seconds", "accrued_at", "projection"])
    TrainingJob.objects.filter(pk=job.pk).update(cost_actual=cost.accrued)
    job.cost_actual = cost.accrued
    return cost


def _variance_check(job, cost: JobCost, now: datetime) -> None:
    limit = conf.variance_alert_percent()
    variance = cost.variance_pct
    if variance is None or variance <= limit or cost.variance_alerted_at:
        return
    if JobCost.objects.filter(pk=cost.pk, variance_alerted_at__isnull=True).update(
        variance_alerted_at=now
    ):
        from billing import notifications

        notifications.cost_variance_notify(job=job, cost=cost)


def costs_accrue(*, now: datetime | None = None) -> dict:
    """Accrue every job holding a GPU (and finished ones not yet final), then check alerts
    and the hard cap. Called by training's reconcile every 20 s; idempotent."""
    from training.models import RUNNING_STATUSES, TERMINAL_STATUSES, TrainingJob

    now = now or timezone.now()
    jobs = (
        TrainingJob.objects.filter(status__in=RUNNING_STATUSES)
        .select_related("billing")
        .order_by("created_at")
    )
    accrued = 0
    unfinalized = TrainingJob.objects.filter(
        status__in=TERMINAL_STATUSES, billing__isnull=False, billing__finalized_at__isnull=True
    )
    for job in unfinalized:
        job_finalize(job=job)
    for job in jobs:
        cost = getattr(job, "billing", None)
        cost = job_cost_accrue(job=job, now=now, cost=cost)
        _variance_check(job, cost, now)
        accrued += 1
    llm_reservations_expire(now=now)  # holds of LLM calls whose process died
    alerts = budget_alerts_check(now=now)
    stopped = hard_cap_enforce(now=now)
    return {"accrued": accrued, "alerts": alerts, "stopped": stopped}


def job_finalize(*, job) -> JobCost:
    """Final accrual of a finished job; its reservation is released."""
    job.refresh_from_db()
    cost = job_cost_accrue(job=job, now=timezone.now())
    if not job.is_terminal:  # called before the terminal status was written
        return cost
    cost.reserved = Decimal(0)
    cost.finalized_at = timezone.now()
    cost.save(update_fields=["reserved", "finalized_at"])
    _variance_check(job, cost, timezone.now())
    return cost


# --- Alerts and the hard cap ------------------------------------------------------------------


def budget_alerts_check(*, now: datetime | None = None) -> list[int]:
    """Send each threshold's alert once a month when spending crosses it.

    The alert row is created first (the unique threshold and month make it once), then sent:
    a process killed in between leaves it pending (``delivered_at`` null), and the next check
    sends what is left of it (``budget_alert_deliver``).
    """
    month = month_start(now)
    for pending in BudgetAlert.objects.filter(delivered_at__isnull=True).order_by("pk"):
        budget_alert_deliver(alert=pending)
    budget = budget_get(month=month)
    if budget.amount <= 0:
        return []
    spent = month_spent(month=month)
    fired = []
    for threshold in sorted(budget.alert_thresholds, key=lambda t: t["percent"]):
        percent = int(threshold["percent"])
        if spent * 100 < budget.amount * percent:
            continue
        if BudgetAlert.objects.filter(month=month, threshold=percent).exists():
            continue
        summary = budget_summary(month=month)
        try:
            with transaction.atomic():
                alert = BudgetAlert.objects.create(
                    month=month,
                    threshold=percent,
                    channels=threshold.get("channels") or ["email"],
                    spent=summary["spent"],
                    budget=summary["budget"],
                    forecast=summary["forecast"],
                    active_jobs=summary["active_jobs"],
                )
        except IntegrityError:
            continue  # another process sent it
        budget_alert_deliver(alert=alert, summary=summary)
        logger.warning(
            "budget alert %s%% for %s: spent $%s of $%s", percent, month, spent, budget.amount
        )
        fired.append(percent)
    return fired


def budget_alert_deliver(*, alert: BudgetAlert, summary: dict | None = None) -> dict:
    """Send the alert on each of its channels not tried yet, once: the alert is claimed for
    ``conf.alert_delivery_lease_s()`` (a second process leaves it alone meanwhile), and each
    channel's outcome is stored as soon as it is known, so a process killed midway leaves only
    the channels it had not reached for the next one."""
    from billing import notifications

    now = timezone.now()
    claimed = (
        BudgetAlert.objects.filter(pk=alert.pk, delivered_at__isnull=True)
        .filter(Q(delivery_claimed_until__isnull=True) | Q(delivery_claimed_until__lt=now))
        .update(delivery_claimed_until=now + timedelta(seconds=conf.alert_delivery_lease_s()))
    )
    if not claimed:
        return {}
    alert.refresh_from_db()
    if summary is None:  # a pending alert: sent with the month's figures of now
        summary = budget_summary(month=alert.month)
    delivery = dict(alert.delivery or {})
    for channel in alert.channels:
        if channel in delivery:
            continue  # tried by an earlier process
        delivery[channel] = notifications.budget_alert_notify(
            alert=alert, summary=summary, channels=[channel]
        ).get(channel, {"ok": False, "skipped": f"unknown channel {channel}"})
        BudgetAlert.objects.filter(pk=alert.pk).update(delivery=delivery)
    BudgetAlert.objects.filter(pk=alert.pk).update(
        delivered_at=timezone.now(), delivery_claimed_until=None
    )
    return delivery


def hard_cap_enforce(*, now: datetime | None = None) -> list[str]:
    """At the hard cap, checkpoint and stop every paying job not started with an override.

    training_job_cancel sends SIGTERM: the worker saves a checkpoint, then exits.
    """
    from training.models import RUNNING_STATUSES
    from training.services import training_job_cancel

    month = month_start(now)
    budget = budget_get(month=month)
    if budget.amount <= 0 and not LedgerEntry.objects.filter(month=month).exists():
        return []
    spent = month_spent(month=month)
    cap = budget.amount * budget.hard_cap_percent / 100
    if spent < cap:
        return []
    stopped = []
    costs = JobCost.objects.filter(
        job__status__in=RUNNING_STATUSES,
        rate_per_hour__gt=0,
        overridden_at__isnull=True,
        capped_at__isnull=True,
    ).select_related("job")
    for cost in costs:
        job = cost.job
        try:
            training_job_cancel(job=job, user=None)
        except Conflict:
            continue  # finished meanwhile
        JobCost.objects.filter(pk=cost.pk).update(capped_at=timezone.now())
        AuditEntry.objects.create(
            action=AuditEntry.Action.HARD_CAP_STOP,
            job=job,
            reason="budget hard cap",
            details={
                "month": f"{month:%Y-%m}",
                "spent": str(spent),
                "budget": str(budget.amount),
                "hard_cap_percent": budget.hard_cap_percent,
                "job_cost": str(cost.accrued),
            },
        )
        logger.warning("job %s stopped at the budget hard cap ($%s of $%s)", job.pk, spent, cap)
        stopped.append(str(job.pk))
    return stopped


# --- LLM tokens (the model gateway) -------------------------------------------------------------


def llm_usage_record(
    *,
    amount: Decimal,
    tokens: int,
    model: str,
    subject=None,
    attribution: str = "",
    at: datetime | None = None,
) -> LedgerEntry:
    """One LLM call's (or batch's) spend, for the model gateway to call."""
    if amount < 0 or tokens < 0:
        raise InvalidInput("amount and tokens cannot be negative.")
    day = timezone.localtime(at or timezone.now()).date()
    entry = LedgerEntry(
        kind=LedgerEntry.Kind.LLM_TOKENS,
        day=day,
        month=day.replace(day=1),
        amount=Decimal(amount).quantize(MICRO),
        quantity=Decimal(tokens),
        unit="token",
        rate=(Decimal(amount) / tokens if tokens else Decimal(0)).quantize(Decimal("0.0000000001")),
        attribution=attribution,
        description=f"LLM tokens: {model}"[:300],
    )
    if subject is not None:
        entry.subject = subject
    entry.save()
    return entry


# --- LLM calls: reservations against the budget, the ledger, spend summaries -------------------


def llm_reserved(*, month: date, now: datetime | None = None) -> Decimal:
    """What the month's LLM calls in flight hold (reservations not yet expired)."""
    now = now or timezone.now()
    total = LlmReservation.objects.filter(month=month, expires_at__gt=now).aggregate(
        s=Sum("amount")
    )["s"]
    return total or Decimal(0)


E8 = 100_000_000  # LlmCall.cost's 8 places: MonthlyBudget.llm_spent_e8 counts in 1e-8 dollars


def _e8(amount: Decimal) -> int:
    """Dollars (any precision) as the counter's integer units of $0.00000001."""
    return int(Decimal(amount).quantize(NANO) * E8)


def _dec(value) -> Decimal:
    # SQLite returns decimals (and their sums) as floats: back to the columns' 8 places.
    return Decimal(str(value)).quantize(NANO) if value is not None else Decimal(0)


def _llm_spent_summed_e8(month: date) -> int:
    """The month's gateway spend summed from the ledger, in counter units (exact on SQLite:
    each row is rounded to an integer before the sum)."""
    sql = (
        f"SELECT SUM(ROUND(cost * {E8})) FROM {LlmCall._meta.db_table} "  # noqa: S608
        "WHERE month = %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [connection.ops.adapt_datefield_value(month)])
        (total,) = cursor.fetchone()
    return int(total or 0)


def _budget_row_locked(month: date) -> tuple[Decimal, int]:
    """(amount, gateway spend in counter units) of the month's budget row, locked for the
    rest of the transaction (created from the inherited values first when the month has
    none; the counter summed from the ledger once when it is not known). One statement when
    the row and its counter exist: the hot path of every priced LLM call.

    SELECT ... FOR UPDATE on PostgreSQL returns the newest committed version of the row after
    waiting for its lock, so the counter read here already holds every settlement committed
    before; SQLite's IMMEDIATE transactions run one at a time."""
    table = MonthlyBudget._meta.db_table
    lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
    sql = f"SELECT id, amount, llm_spent_e8 FROM {table} WHERE month = %s{lock}"  # noqa: S608
    day = connection.ops.adapt_datefield_value(month)
    with connection.cursor() as cursor:
        cursor.execute(sql, [day])
        row = cursor.fetchone()
        if row is None:
            _budget_locked(month)
            cursor.execute(sql, [day])
            row = cursor.fetchone()
        pk, amount, spent = row
        if spent is None:
            spent = _llm_spent_summed_e8(month)
            cursor.execute(f"UPDATE {table} SET llm_spent_e8 = %s WHERE id = %s", [spent, pk])  # noqa: S608
    return Decimal(str(amount)).quantize(CENT), int(spent)


NO_FLUSH_WAIT = "SET LOCAL synchronous_commit TO OFF"


def _server_side_binding() -> bool:
    return bool(connection.settings_dict.get("OPTIONS", {}).get("server_side_binding"))


def _llm_spent_add(month: date, delta_e8: int, *, no_flush_wait: bool = False) -> None:
    """Move the month's gateway spend counter by ``delta_e8`` (0: only take the row's lock).

    Call it before changing any call's cost in the same transaction: the UPDATE takes the
    budget row's lock first, so a reservation never reads a counter that misses a cost
    committed before it (the reservation then waits for this transaction), and a counter
    being summed from the ledger (NULL + delta stays NULL) never misses one either. A month
    without a row gets one (its counter is then summed at the next reservation).
    ``no_flush_wait`` (PostgreSQL): the transaction's commit does not wait for the WAL
    flush, set in the same round trip as the UPDATE with Django's default client-side binding
    (both statements in one query; ``nextset`` moves to the UPDATE's result)."""
    table = MonthlyBudget._meta.db_table
    sql = f"UPDATE {table} SET llm_spent_e8 = llm_spent_e8 + %s WHERE month = %s"  # noqa: S608
    day = connection.ops.adapt_datefield_value(month)
    with connection.cursor() as cursor:
        if no_flush_wait and not _server_side_binding():
            cursor.execute(f"{NO_FLUSH_WAIT}; {sql}", [delta_e8, day])
            cursor.nextset()
        else:
            if no_flush_wait:  # a bound (or prepared) statement is one statement a query
                cursor.execute(NO_FLUSH_WAIT)
            cursor.execute(sql, [delta_e8, day])
        if cursor.rowcount == 0:
            _budget_locked(month)
            cursor.execute(sql, [delta_e8, day])


def llm_spent_counter_reset(*, month: date) -> None:
    """Forget the month's counter (it is summed again at the next reservation): a ledger row
    was written or deleted outside billing's own settlement paths (the admin, a test)."""
    MonthlyBudget.objects.filter(month=month).update(llm_spent_e8=None)


def _gpu_spend_holds_and_jobs(month: date, now: datetime) -> tuple[Decimal, Decimal, Decimal]:
    """(GPU and old-style LLM ledger entries, unexpired LLM reservations, what active
    training jobs still expect to spend) of the month, in one statement read after the
    budget row's lock: one row per active job, then one row with the two sums.

    Plain SQL on purpose: this runs in every priced LLM call's reservation, and compiling the
    equivalent ORM queries costs more than executing them. The SQL is portable (SQLite and
    PostgreSQL); table names come from the models, every value is a parameter.
    """
    from training.models import ACTIVE_STATUSES, TrainingJob

    ops = connection.ops
    day = ops.adapt_datefield_value(month)
    statuses = [str(s) for s in ACTIVE_STATUSES]
    placeholders = ", ".join(["%s"] * len(statuses))
    sql = (
        "SELECT 1, c.projection, c.estimate_cost, c.reserved, c.accrued "  # noqa: S608
        f"FROM {JobCost._meta.db_table} c JOIN {TrainingJob._meta.db_table} j "
        f"ON j.id = c.job_id WHERE j.status IN ({placeholders}) "
        "UNION ALL SELECT 0, NULL, "
        f"(SELECT SUM(amount) FROM {LedgerEntry._meta.db_table} WHERE month = %s), "
        f"(SELECT SUM(amount) FROM {LlmReservation._meta.db_table} "
        "WHERE month = %s AND expires_at > %s), NULL"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [*statuses, day, day, ops.adapt_datetimefield_value(now)])
        rows = cursor.fetchall()
    ledger = holds = Decimal(0)
    jobs = Decimal(0)
    for kind, projection, estimate_cost, reserved, accrued in rows:
        if kind == 0:
            ledger, holds = _dec(estimate_cost), _dec(reserved)
            continue
        if isinstance(projection, str):
            projection = json.loads(projection or "{}")
        cost = JobCost(
            projection=projection or {},
            estimate_cost=None if estimate_cost is None else Decimal(str(estimate_cost)),
            reserved=Decimal(str(reserved or 0)),
            accrued=Decimal(str(accrued or 0)),
        )
        jobs += _remaining(cost)
    return ledger, holds, money(jobs)


# Set by the model gateway (jobs.gateway.client): the settlement of an orphaned call from what
# the gateway knows (its answer in the response cache); None settles at the held worst case.
orphan_resolver: Callable[[LlmReservation], dict] | None = None


def llm_reservations_expire(*, now: datetime | None = None) -> int:
    """Reservations past their expiry (their process died before settling): a write-ahead
    ledger row still in flight is settled (``llm_orphan_settle``), then the hold goes."""
    expired = LlmReservation.objects.filter(expires_at__lte=now or timezone.now())
    count = 0
    for reservation in expired.filter(call__outcome=LLM_IN_FLIGHT).select_related("call"):
        fields = orphan_resolver(reservation) if orphan_resolver else {}
        llm_orphan_settle(reservation=reservation, **fields)
        count += 1
    deleted, _ = expired.delete()
    return count + deleted


def llm_orphans(*, now: datetime | None = None, subject_type=None, subject_ids=None):
    """Write-ahead ledger rows still in flight whose process is gone, as their reservations:
    those past expiry, or (``subject_ids``) those of subjects whose worker is known dead."""
    qs = LlmReservation.objects.filter(call__outcome=LLM_IN_FLIGHT).select_related("call")
    if subject_ids is not None:
        ids = [str(pk) for pk in subject_ids]
        of_subjects = qs.filter(call__content_type=ContentType.objects.get_for_model(subject_type))
        # 10,000 ids per IN list: under the databases' bound-parameter limits.
        return [
            reservation
            for start in range(0, len(ids), 10_000)
            for reservation in of_subjects.filter(call__object_id__in=ids[start : start + 10_000])
        ]
    return qs.filter(expires_at__lte=now or timezone.now())


def llm_orphan_settle(
    *,
    reservation: LlmReservation,
    outcome: str = "error:worker_lost",
    prompt_tokens: int | None = None,
    completion_tokens: int = 0,
    cost: Decimal | None = None,
) -> bool:
    """Settle the in-flight ledger row of a call whose process died: its tokens and cost when
    known (its answer reached the response cache), else the held worst case (the provider may
    have charged for it). Conditional on the row still being in flight: a process that was
    only slow settles it itself (``llm_call_record`` overwrites by id). True when settled."""
    cost = (reservation.amount if cost is None else Decimal(cost)).quantize(NANO)
    fields = {
        "outcome": outcome[:64],
        "cost": cost,
        "completion_tokens": max(0, int(completion_tokens)),
    }
    if prompt_tokens is not None:
        fields["prompt_tokens"] = max(0, int(prompt_tokens))
    with transaction.atomic():
        # The month's spend counter first (its row's lock), then the row: an in-flight row
        # costs 0, so the settled cost is the whole change (taken back if it was not settled).
        if cost:
            _llm_spent_add(reservation.month, _e8(cost))
        settled = (
            LlmCall.objects.filter(pk=reservation.call_id, outcome=LLM_IN_FLIGHT).update(**fields)
            == 1
        )
        if cost and not settled:
            _llm_spent_add(reservation.month, -_e8(cost))
        LlmReservation.objects.filter(pk=reservation.pk).delete()
    if settled:
        llm_call_settled.send(sender=LlmCall, call=LlmCall.objects.get(pk=reservation.call_id))
    return settled


def llm_budget_reserve(
    *,
    amount: Decimal,
    model: str,
    feature: str = "",
    request_id: str = "",
    ttl_s: float = 600.0,
) -> LlmReservation:
    """Hold ``amount`` (a call's worst-case cost) against this month's budget, or refuse
    with BudgetExceeded when spent + reserved (GPU jobs and LLM calls) + amount is over it.

    Concurrency-safe: the month's budget row is locked (SELECT ... FOR UPDATE on PostgreSQL;
    SQLite's IMMEDIATE transactions take the write lock at BEGIN), so two reservations are
    never decided on the same figures.
    """
    amount = Decimal(amount).quantize(NANO)
    if amount < 0:
        raise InvalidInput("A reservation cannot be negative.")
    now = timezone.now()
    with transaction.atomic():
        reservation = _llm_reservation(
            amount=amount, model=model, feature=feature, request_id=request_id, ttl_s=ttl_s, now=now
        )
        reservation.save()
        return reservation


def _llm_reservation(
    *, amount: Decimal, model: str, feature: str, request_id: str, ttl_s: float, now: datetime
) -> LlmReservation:
    """The (unsaved) reservation of ``amount``, checked against the month's budget when above
    zero; the caller's transaction holds the budget row's lock until it commits."""
    month = month_start(now)
    if amount > 0:
        # The hot path of every priced LLM call: the month's row locked with its running
        # gateway spend in one statement, then the GPU spend, holds and active jobs in one.
        budget_amount, llm_spent_e8 = _budget_row_locked(month)
        ledger, llm_held, jobs_held = _gpu_spend_holds_and_jobs(month, now)
        spent = money(ledger + Decimal(llm_spent_e8) / E8)
        if spent + llm_held + jobs_held + amount > budget_amount:
            raise BudgetExceeded(
                f"This LLM call would take {month:%B %Y} over its budget: spent ${spent}, "
                f"reserved ${money(llm_held + jobs_held)} by calls and jobs in flight, this "
                f"call's worst case ${money(amount)} ({model}), budget ${budget_amount}.",
                details={
                    "month": f"{month:%Y-%m}",
                    "spent": spent,
                    "reserved": money(llm_held + jobs_held),
                    "estimate": amount,
                    "budget": budget_amount,
                    "remaining": money(budget_amount - spent - llm_held - jobs_held),
                    "model": model,
                },
            )
    return LlmReservation(
        month=month,
        amount=amount,
        model=model[:270],
        feature=feature[:32],
        request_id=request_id[:64],
        created_at=now,
        expires_at=now + timedelta(seconds=ttl_s),
    )


def llm_call_open(
    *,
    amount: Decimal,
    ttl_s: float,
    cache_key: str = "",
    user=None,
    feature: str,
    subject=None,
    attribution: str = "",
    provider: str,
    model: str,
    operation: str = "chat",
    request_id: str = "",
) -> LlmReservation:
    """The write-ahead step of a call about to reach a provider: its ledger row (outcome
    ``in_flight``, one attempt) and its reservation (the worst-case ``amount`` held against the
    budget, checked as ``llm_budget_reserve`` does when above zero) in one transaction,
    committed before the request leaves. ``llm_call_record`` settles both; a process killed in
    between leaves them to ``llm_orphan_settle``. Raises BudgetExceeded (nothing written)."""
    amount = Decimal(amount).quantize(NANO)
    now = timezone.now()
    call = _llm_call_row(
        user=user,
        feature=feature,
        subject=subject,
        attribution=attribution,
        provider=provider,
        model=model,
        operation=operation,
        attempts=1,
        outcome=LLM_IN_FLIGHT,
        request_id=request_id,
        at=now,
    )
    with transaction.atomic():
        reservation = _llm_reservation(
            amount=amount,
            model=model,
            feature=feature,
            request_id=request_id,
            ttl_s=ttl_s,
            now=now,
        )
        call.save()
        reservation.call = call
        reservation.cache_key = cache_key[:64]
        reservation.save()
    return reservation


def llm_call_attempt(*, reservation: LlmReservation | None, attempts: int) -> None:
    """A retry is about to leave: the in-flight row counts it first (a kill during it must not
    lose it)."""
    if reservation is not None and reservation.call_id:
        LlmCall.objects.filter(pk=reservation.call_id).update(attempts=attempts)


def _llm_call_row(
    *,
    user,
    feature: str,
    subject,
    attribution: str,
    provider: str,
    model: str,
    operation: str,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    cost: Decimal = Decimal(0),
    latency_ms: float = 0.0,
    attempts: int = 0,
    cached: bool = False,
    outcome: str = "ok",
    request_id: str = "",
    at: datetime | None = None,
) -> LlmCall:
    at = at or timezone.now()
    day = timezone.localtime(at).date()
    call = LlmCall(
        user=user if getattr(user, "is_authenticated", False) else None,
        feature=feature[:32],
        attribution=attribution[:120],
        provider=provider[:64],
        model=model[:270],
        operation=operation,
        prompt_tokens=max(0, int(prompt_tokens)),
        completion_tokens=max(0, int(completion_tokens)),
        cost=Decimal(cost).quantize(NANO),
        latency_ms=round(float(latency_ms), 3),
        attempts=attempts,
        cached=cached,
        outcome=outcome[:64],
        request_id=(request_id or "")[:64],
        created_at=at,
        day=day,
        month=day.replace(day=1),
    )
    if subject is not None and getattr(subject, "pk", None) is not None:
        call.content_type = ContentType.objects.get_for_model(subject)
        call.object_id = str(subject.pk)
    call._spend_counted = True  # its cost moves the month's counter here, not by a signal
    return call


def llm_ledger_changed(*, call: LlmCall, deleted: bool = False) -> None:
    """A ledger row saved or deleted outside billing's settlement paths (the admin, a test,
    a data fix): the month's spend counter is summed again at the next reservation."""
    if getattr(call, "_spend_counted", False) or (deleted and not call.cost):
        return
    llm_spent_counter_reset(month=call.month)


def _reservation_delete(pk) -> None:
    """DELETE one reservation row by id: plain SQL in the settlement's hot path (nothing
    refers to a reservation and no signal listens, so the ORM's deletion collector has
    nothing to do but costs more than the statement)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {LlmReservation._meta.db_table} WHERE id = %s",  # noqa: S608
            [pk],
        )


def llm_budget_release(*, reservation: LlmReservation | None) -> None:
    if reservation is not None and reservation.pk:
        LlmReservation.objects.filter(pk=reservation.pk).delete()


def llm_call_record(
    *,
    reservation: LlmReservation | None = None,
    user=None,
    feature: str,
    subject=None,
    attribution: str = "",
    provider: str,
    model: str,
    operation: str = "chat",
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    cost: Decimal = Decimal(0),
    latency_ms: float = 0.0,
    attempts: int = 0,
    cached: bool = False,
    outcome: str = "ok",
    request_id: str = "",
    at: datetime | None = None,
) -> LlmCall:
    """One gateway call into the ledger; its reservation (if any) is settled in the same
    transaction, so the month's spend never counts the call twice or not at all. A call that
    wrote ahead (``llm_call_open``) has its in-flight row completed, not a second one."""
    call = _llm_call_row(
        user=user,
        feature=feature,
        subject=subject,
        attribution=attribution,
        provider=provider,
        model=model,
        operation=operation,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cost=cost,
        latency_ms=latency_ms,
        attempts=attempts,
        cached=cached,
        outcome=outcome,
        request_id=request_id,
        at=at,
    )
    cost_e8 = _e8(call.cost)
    if reservation is None:
        if cost_e8:
            with transaction.atomic():
                _llm_spent_add(call.month, cost_e8)
                call.save()
        else:
            call.save()
        llm_call_settled.send(sender=LlmCall, call=call)
        return call
    # The write-ahead row keeps its month (and created_at: when the call left).
    month = reservation.month if reservation.call_id else call.month
    # No wait for the WAL flush at this commit (PostgreSQL, our own transaction): the
    # write-ahead row and its hold were committed durably before the request left, so a
    # settlement lost with a crashed database server leaves the call in flight for recovery
    # to settle (from the response cache, else at the held worst case), never unrecorded; the
    # next durable commit of any session flushes it anyway. A killed worker process loses
    # nothing: the commit has returned.
    no_flush_wait = not connection.in_atomic_block and connection.vendor == "postgresql"
    with transaction.atomic():
        # The spend counter first: its UPDATE takes the month's budget row lock before the
        # cost changes, so a reservation never decides on a counter missing a settled cost.
        if cost_e8:
            _llm_spent_add(month, cost_e8, no_flush_wait=no_flush_wait)
        elif no_flush_wait:
            with connection.cursor() as cursor:
                cursor.execute(NO_FLUSH_WAIT)
        written = False
        if reservation.call_id:
            # The write-ahead row (created_at stays when the call left): completed in place,
            # whatever a recovery that took this process for dead wrote meanwhile.
            values = {
                f.attname: getattr(call, f.attname)
                for f in LlmCall._meta.concrete_fields
                if f.attname not in ("id", "created_at", "day", "month")
            }
            rows = LlmCall.objects.filter(pk=reservation.call_id)
            # Still in flight (cost 0): the common case, the counter already moved by cost.
            written = rows.filter(outcome=LLM_IN_FLIGHT).update(**values) == 1
            if not written:
                if not cost_e8:
                    _llm_spent_add(month, 0)  # the lock, before the cost changes
                before = rows.values_list("cost", flat=True).first()
                if before is not None:  # settled by a recovery meanwhile: overwritten
                    written = rows.update(**values) == 1
                    _llm_spent_add(month, -_e8(before))
            call.pk = reservation.call_id
        if not written:
            call.pk = None
            call.save()
            if cost_e8 and call.month != month:
                _llm_spent_add(month, -cost_e8)
                _llm_spent_add(call.month, cost_e8)
        _reservation_delete(reservation.pk)
    llm_call_settled.send(sender=LlmCall, call=call)
    return call


def llm_spend_summary(*, month: date | None = None) -> dict:
    """The month's LLM spend per model and per feature (calls, cached calls, tokens, cost)."""
    month = month or month_start()
    calls = LlmCall.objects.filter(month=month)

    def rows(field: str) -> list[dict]:
        out = []
        for row in (
            calls.values(field)
            .annotate(
                calls=Count("id"),
                cached=Count("id", filter=Q(cached=True)),
                failed=Count("id", filter=~Q(outcome="ok")),
                prompt_tokens=Sum("prompt_tokens"),
                completion_tokens=Sum("completion_tokens"),
                cost=Sum("cost"),
            )
            .order_by("-cost", field)
        ):
            out.append({**row, "cost": (row["cost"] or Decimal(0)).quantize(MICRO)})
        return out

    total = calls.aggregate(
        calls=Count("id"),
        cached=Count("id", filter=Q(cached=True)),
        cost=Sum("cost"),
        prompt_tokens=Sum("prompt_tokens"),
        completion_tokens=Sum("completion_tokens"),
    )
    return {
        "month": f"{month:%Y-%m}",
        "calls": total["calls"],
        "cached": total["cached"],
        "prompt_tokens": total["prompt_tokens"] or 0,
        "completion_tokens": total["completion_tokens"] or 0,
        "cost": (total["cost"] or Decimal(0)).quantize(MICRO),
        "reserved": llm_reserved(month=month).quantize(MICRO),
        "by_model": rows("model"),
        "by_feature": rows("feature"),
    }


# --- Export -----------------------------------------------------------------------------------


CSV_COLUMNS = [
    "date",
    "month",
    "kind",
    "subject_type",
    "subject_id",
    "description",
    "attribution",
    "quantity",
    "unit",
    "rate_per_unit",
    "amount_usd",
]


def ledger_csv(*, month: date) -> str:
    entries = (
        LedgerEntry.objects.filter(month=month).select_related("content_type").order_by("day", "id")
    )
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    total = Decimal(0)
    for e in entries:
        total += e.amount
        writer.writerow(
            [
                e.day.isoformat(),
                f"{e.month:%Y-%m}",
                e.kind,
                e.content_type.model if e.content_type else "",
                e.object_id,
                e.description,
                e.attribution,
                f"{e.quantity:.4f}",
                e.unit,
                f"{e.rate:.10f}",
                f"{e.amount:.6f}",
            ]
        )
    writer.writerow(["", f"{month:%Y-%m}", "total", "", "", "", "", "", "", "", f"{total:.6f}"])
    return out.getvalue()


def job_cost_detail(*, job_id) -> dict:
    """A job's cost so far against its estimate, for the job page and the API.

    accrued: dollars so far (GPU time held, every launch, at the job's rate; refreshed by
    the scheduler at least every 60 s); estimate: the point estimate at start, with its
    range (estimate_low/high); variance_pct: accrued against the estimate (negative while
    the job is under it); warning: over it by more than warning_percent (the seed's 20%);
    projection: the re-estimate from the measured speed while training (final_cost, eta,
    seconds_left), projected_variance_pct/projected_warning the same check on its final cost.
    """
    from training.models import TrainingJob

    job = TrainingJob.objects.select_related("billing").filter(pk=job_id).first()
    if job is None:
        raise NotFound(f"No training job {job_id}.")
    cost = getattr(job, "billing", None)
    if cost is None:
        return {"job_id": str(job.pk), "status": job.status, "accrued": Decimal(0)}
    variance = cost.variance_pct
    limit = conf.variance_alert_percent()
    projected = cost.projection.get("final_cost") if cost.projection else None
    projected_variance = (
        round(100 * (projected / float(cost.estimate_cost) - 1), 1)
        if projected is not None and cost.estimate_cost
        else None
    )
    estimate_range = (cost.estimate or {}).get("cost") or {}
    return {
        "job_id": str(job.pk),
        "status": job.status,
        "gpu_type": cost.gpu_type,
        "spot": cost.spot,
        "rate_per_hour": cost.rate_per_hour,
        "held_seconds": round(cost.held_seconds, 1),
        "accrued": money(cost.accrued),
        "accrued_at": cost.accrued_at,
        "estimate": cost.estimate_cost,
        "estimate_text": (cost.estimate or {}).get("text", ""),
        "variance_pct": variance,
        "warning": variance is not None and variance > limit,
        "estimate_low": money(estimate_range["low"]) if "low" in estimate_range else None,
        "estimate_high": money(estimate_range["high"]) if "high" in estimate_range else None,
        "warning_percent": limit,
        "projection": cost.projection or None,
        "projected_variance_pct": projected_variance,
        "projected_warning": projected_variance is not None and projected_variance > limit,
        "reserved": cost.reserved,
        "approved": cost.approved_at is not None,
        "override_reason": cost.override_reason,
        "capped_at": cost.capped_at,
    }


def admin_recipients() -> list[str]:
    from django.db.models import Q

    users = get_user_model().objects.filter(
        Q(is_superuser=True) | Q(groups__name="admin"), is_active=True
    )
    emails = {u.email for u in users.exclude(email="")}
    return sorted(emails | set(conf.alert_emails()))
