"""Training pages: the job list, the new-job form, one job's page and its chart data.

Actions on a job (cancel, retry, switch to on-demand) and downloads go through the JSON API
(/api/v1/training/...), which accepts the browser session. The new-job form and the notes
and tags editor post here and call training.services.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation

from django.contrib import messages
from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import Avg, Count, DurationField, ExpressionWrapper, F, Q
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.utils.cache import patch_vary_headers
from django.utils.dateparse import parse_date
from django.views.decorators.http import require_POST

from config.errors import CrucibleError
from config.roles import can_change
from config.storage import storage_open
from config.views import dashboard_view
from corpora.models import TrainingFile
from training import charts, hooks, services
from training.forms import (
    ADVANCED_FIELDS,
    AnnotateForm,
    NewJobForm,
    preset_cards,
    runpod_available,
)
from training.models import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    JobStatus,
    JobTemplate,
    Preset,
    TrainingJob,
    WebhookEvent,
)

logger = logging.getLogger("crucible.training")

PAGE_SIZE = 25
EVENT_LIMIT = 50
LIVE_REFRESH_S = 5
MINUS = "\u2212"  # a typographic minus for perplexity deltas

STATUS_FILTERS = [
    ("", "All statuses"),
    ("active", "Active (queued or running)"),
    *JobStatus.choices,
]

# Stages a job goes through, in order (the timeline draws these).
STAGE_ORDER = [
    JobStatus.PENDING,
    JobStatus.QUEUED,
    JobStatus.PROVISIONING,
    JobStatus.PREPROCESSING,
    JobStatus.MODEL_LOADING,
    JobStatus.TRAINING,
    JobStatus.FINALIZATION,
]

DATASET_FIELDS = [
    ("conversations", "Conversations"),
    ("train_conversations", "Training conversations"),
    ("val_conversations", "Validation conversations (held out)"),
    ("train_examples", "Training examples (1 per conversation)"),
    ("train_tokens", "Training tokens"),
    ("val_tokens", "Validation tokens"),
    ("truncated_examples", "Truncated examples"),
    ("max_seq_length", "Max sequence length"),
    ("total_steps", "Planned steps"),
]

RUN_SETTINGS = [
    ("validation_split", "Validation split"),
    ("checkpoint_every_steps", "Checkpoint every (steps)"),
    ("logging_steps", "Log every (steps)"),
    ("heartbeat_seconds", "Heartbeat (s)"),
]

RESUME_FIELDS = [
    ("resumed_from_step", "Resumed from step"),
    ("expected_step", "Expected step"),
    ("actual_step", "Actual step"),
    ("expected_learning_rate", "Expected LR"),
    ("actual_learning_rate", "Actual LR"),
    ("last_logged_loss", "Last loss before"),
    ("first_loss_after_resume", "First loss after"),
]


# --- Formatting helpers -----------------------------------------------------------------------


def format_duration(seconds: float | None) -> str:
    """``42s``, ``3m 05s``, ``2h 14m``, ``3d 4h``; empty for None."""
    if seconds is None:
        return ""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def _number(value) -> str:
    """Metric values as people read them: 1.2346, 2.0e-04, 12,345."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) < 1e-3:
            return f"{value:.2e}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _elapsed_seconds(job: TrainingJob, now: datetime) -> float | None:
    if job.started_at is None:
        return None
    end = job.completed_at if job.is_terminal and job.completed_at else now
    return (end - job.started_at).total_seconds()


def _decorate(job: TrainingJob, now: datetime) -> TrainingJob:
    """Display values the templates need, computed once per job."""
    job.duration_display = format_duration(_elapsed_seconds(job, now))
    job.creator_name = (
        (job.created_by.get_full_name() or job.created_by.get_username())
        if job.created_by
        else "system"
    )
    job.progress_pct = round(min(100.0, max(0.0, job.progress or 0.0)), 1)
    job.progress_css = f"{job.progress_pct:.1f}"
    job.eta_display = format_duration(job.eta_seconds)
    pct = job.perplexity_improvement_pct
    job.ppl_delta = "" if pct is None else f"{MINUS if pct >= 0 else '+'}{abs(pct):.0f}%"
    return job


# --- List ----------------------------------------------------------------------------------


SORTS = {
    "-created": ("Newest first", ("-created_at", "-id")),
    "created": ("Oldest first", ("created_at", "id")),
    "name": ("Name A to Z", ("name", "id")),
    "-cost": ("Cost, highest first", ("-cost_actual", "-created_at")),
    "cost": ("Cost, lowest first", ("cost_actual", "-created_at")),
    "-duration": ("Longest first", (F("duration").desc(nulls_last=True), "-created_at")),
    "duration": ("Shortest first", (F("duration").asc(nulls_last=True), "-created_at")),
    "status": ("Status", ("status", "-created_at")),
}
# Column headers that sort: the first click sorts the natural way for that column.
SORTABLE_COLUMNS = {"job": "name", "cost": "-cost", "duration": "-duration", "status": "status"}


def _money(value: str) -> Decimal | None:
    try:
        amount = Decimal(value.strip().lstrip("$"))
    except (InvalidOperation, AttributeError):
        return None
    return amount if amount.is_finite() and amount >= 0 else None


def _list_filters(request: HttpRequest) -> dict:
    """The list's filters from the query string; values that do not parse are dropped and
    reported in ``invalid`` (the page says which)."""
    get = request.GET
    status = get.get("status", "")
    if status not in dict(STATUS_FILTERS):
        status = ""
    filters = {
        "status": status,
        "q": get.get("q", "").strip()[:200],
        "preset": get.get("preset", "").strip()[:32],
        "creator": get.get("creator", "").strip()[:150],
        "tag": get.get("tag", "").strip().lower()[:50],
        "from": "",
        "to": "",
        "cost_min": "",
        "cost_max": "",
    }
    invalid = []
    for key, label in (("from", "From date"), ("to", "To date")):
        raw = get.get(key, "").strip()
        if raw:
            try:
                parsed = parse_date(raw)
            except ValueError:
                parsed = None
            if parsed is None:
                invalid.append(f"{label} must be a date like 2026-11-30.")
            else:
                filters[key] = parsed.isoformat()
    for key, label in (("cost_min", "Minimum cost"), ("cost_max", "Maximum cost")):
        raw = get.get(key, "").strip()
        if raw:
            if _money(raw) is None:
                invalid.append(f"{label} must be an amount in dollars, like 25 or 12.50.")
            else:
                filters[key] = raw.strip().lstrip("$")
    if filters["from"] and filters["to"] and filters["from"] > filters["to"]:
        invalid.append("The from date is after the to date.")
    sort = get.get("sort", "")
    return {"filters": filters, "sort": sort if sort in SORTS else "-created", "invalid": invalid}


def _filtered_jobs(filters: dict, sort: str = "-created"):
    jobs = TrainingJob.objects.for_list()
    if filters["status"] == "active":
        jobs = jobs.active()
    elif filters["status"]:
        jobs = jobs.filter(status=filters["status"])
    if filters["preset"]:
        jobs = jobs.filter(preset__key=filters["preset"])
    if filters["creator"]:
        jobs = jobs.filter(created_by__username=filters["creator"])
    if filters["tag"]:
        # The JSON text holds each tag quoted; this works on SQLite and PostgreSQL alike.
        jobs = jobs.filter(tags__icontains=json.dumps(filters["tag"]))
    if filters["q"]:
        q = filters["q"]
        jobs = jobs.filter(Q(name__icontains=q) | Q(notes__icontains=q) | Q(tags__icontains=q))
    tz = timezone.get_current_timezone()
    if filters["from"]:
        day = datetime.fromisoformat(filters["from"])
        jobs = jobs.filter(created_at__gte=timezone.make_aware(day, tz))
    if filters["to"]:
        day = datetime.fromisoformat(filters["to"]) + timedelta(days=1)
        jobs = jobs.filter(created_at__lt=timezone.make_aware(day, tz))
    if filters["cost_min"]:
        jobs = jobs.filter(cost_actual__gte=_money(filters["cost_min"]))
    if filters["cost_max"]:
        jobs = jobs.filter(cost_actual__lte=_money(filters["cost_max"]))
    if sort in ("duration", "-duration"):
        jobs = jobs.annotate(
            duration=ExpressionWrapper(
                F("completed_at") - F("started_at"), output_field=DurationField()
            )
        )
    return jobs.order_by(*SORTS[sort][1])


def _summary() -> dict:
    """Counts over every job (one query), for the tiles above the table."""
    return TrainingJob.objects.aggregate(
        total=Count("id"),
        active=Count("id", filter=Q(status__in=ACTIVE_STATUSES)),
        completed=Count("id", filter=Q(status=JobStatus.COMPLETED)),
        failed=Count("id", filter=Q(status=JobStatus.FAILED)),
        avg_improvement=Avg(
            100 * (1 - F("perplexity_trained") / F("perplexity_baseline")),
            filter=Q(
                status=JobStatus.COMPLETED,
                perplexity_baseline__gt=0,
                perplexity_trained__isnull=False,
            ),
        ),
    )


def _wants_partial(request: HttpRequest, target: str) -> bool:
    htmx = getattr(request, "htmx", None)
    return bool(htmx) and not htmx.history_restore_request and htmx.target == target


def _sort_links(request: HttpRequest, sort: str) -> dict:
    """Per sortable column: the URL that sorts by it (or flips it) and its aria-sort."""
    links = {}
    for column, natural in SORTABLE_COLUMNS.items():
        key = natural.lstrip("-")
        current = sort.lstrip("-") == key
        if current:
            target = key if sort.startswith("-") else f"-{key}"
            state = "descending" if sort.startswith("-") else "ascending"
        else:
            target, state = natural, "none"
        query = request.GET.copy()
        query["sort"] = target
        query.pop("page", None)
        links[column] = {"url": f"?{query.urlencode()}", "aria": state, "active": current}
    return links


def _reverse_or_none(name: str) -> str | None:
    try:
        return reverse(name)
    except NoReverseMatch:
        return None


@dashboard_view
def index(request: HttpRequest) -> HttpResponse:
    parsed = _list_filters(request)
    filters, sort = parsed["filters"], parsed["sort"]
    page = Paginator(_filtered_jobs(filters, sort), PAGE_SIZE).get_page(request.GET.get("page"))
    now = timezone.now()
    jobs = [_decorate(job, now) for job in page.object_list]
    context = {
        "section": "training",
        "page": page,
        "jobs": jobs,
        "filters": filters,
        "sort": sort,
        "sorts": [(key, label) for key, (label, _) in SORTS.items()],
        "sort_links": _sort_links(request, sort),
        "invalid": parsed["invalid"],
        "filtered": any(filters.values()),
        "more_filters": any(
            filters[k] for k in ("creator", "tag", "from", "to", "cost_min", "cost_max")
        ),
        "any_active": any(job.is_active for job in jobs),
        "refresh_s": LIVE_REFRESH_S,
        "can_run": request.user.has_perm("core.run_jobs"),
        "compare_url": _reverse_or_none("training:compare"),
    }
    if _wants_partial(request, "training-jobs"):
        response = render(request, "training/index.html#job-table", context)
    else:
        context |= {
            "status_filters": STATUS_FILTERS,
            "presets": list(Preset.objects.only("key", "name")),
            "creators": _creators(),
            "summary": _summary(),
            "new_url": reverse("training:new"),
        }
        response = render(request, "training/index.html", context)
    patch_vary_headers(response, ["HX-Request", "HX-Target"])
    return response


def _creators() -> list[tuple[str, str]]:
    """Everyone who created a job: (username, display name), one query."""
    from django.contrib.auth import get_user_model

    users = (
        get_user_model()
        .objects.filter(pk__in=TrainingJob.objects.values("created_by"))
        .order_by("username")
        .only("username", "first_name", "last_name")
    )
    return [(u.get_username(), u.get_full_name() or u.get_username()) for u in users]


# --- Detail --------------------------------------------------------------------------------


def _timeline(job: TrainingJob, now: datetime) -> list[dict]:
    """Each stage the job entered, with how long it stayed there."""
    transitions = list(job.transitions.all())
    entries = [
        {
            "status": JobStatus.PENDING,
            "label": JobStatus.PENDING.label,
            "at": job.created_at,
            "reason": "created",
        }
    ]
    for t in transitions:
        entries.append(
            {
                "status": t.to_status,
                "label": JobStatus(t.to_status).label,
                "at": t.at,
                "reason": t.reason,
            }
        )
    for i, entry in enumerate(entries):
        nxt = entries[i + 1]["at"] if i + 1 < len(entries) else None
        terminal = entry["status"] in TERMINAL_STATUSES
        entry["current"] = nxt is None and not terminal
        entry["terminal"] = terminal
        if nxt is not None:
            entry["duration"] = format_duration((nxt - entry["at"]).total_seconds())
        elif not terminal:
            entry["duration"] = format_duration((now - entry["at"]).total_seconds())
        else:
            entry["duration"] = ""
    return entries


def _loss(value) -> str:
    """A loss with 4 decimals: the same digits on the results, the card and the chart."""
    return "—" if value is None else f"{value:.4f}"


def _val_loss_label(step) -> str:
    if step is None:
        return "Validation loss (held-out split)"
    return f"Validation loss (step {step:,}, held-out split)"


def _latest_metrics(job: TrainingJob) -> list[tuple[str, str]]:
    m = job.latest_metrics or {}
    memory = m.get("gpu_memory_mb")
    rows = [
        ("Step", _number(m.get("step"))),
        ("Epoch", f"{m['epoch']:.2f}" if m.get("epoch") is not None else "—"),
        ("Train loss", _loss(m.get("train_loss"))),
        (_val_loss_label(m.get("val_loss_step")), _loss(m.get("val_loss"))),
        ("Learning rate", _number(m.get("learning_rate"))),
        ("Grad norm", _number(m.get("grad_norm"))),
        (
            "Tokens / s",
            f"{m['tokens_per_second']:,.0f}" if m.get("tokens_per_second") is not None else "—",
        ),
        (
            "GPU memory",
            f"{memory / 1024:.1f} GiB" if memory else ("CPU" if "gpu_memory_mb" in m else "—"),
        ),
    ]
    return rows


def _error(job: TrainingJob) -> dict | None:
    if job.status != JobStatus.FAILED and not job.error_type:
        return None
    details = job.error_details or {}
    current = {
        **(job.configuration or {}).get("hyperparameters", {}),
        **{k: v for k, v in (job.configuration or {}).items() if k != "hyperparameters"},
    }
    changes = details.get("suggested_changes") or {}
    location = [
        (label, details[key])
        for key, label in (
            ("row", "Row (line)"),
            ("conversation_id", "Conversation"),
            ("field", "Field"),
        )
        if details.get(key) not in (None, "")
    ]
    return {
        "type": job.error_type or "WorkerError",
        "title": details.get("title") or "The job failed",
        "message": job.error_message,
        "fix": details.get("fix", ""),
        "retryable": details.get("retryable", True),
        "changes": [
            {"field": k, "old": _number(current.get(k)), "new": _number(v)}
            for k, v in changes.items()
        ],
        "retry_label": (
            "Retry with " + ", ".join(f"{k}={_number(v)}" for k, v in changes.items())
            if changes
            else "Retry"
        ),
        "location": location,
        "traceback": details.get("traceback", ""),
    }


def _results(job: TrainingJob) -> dict | None:
    if job.status != JobStatus.COMPLETED:
        return None
    base, trained = job.perplexity_baseline, job.perplexity_trained
    pct = job.perplexity_improvement_pct
    summary = ""
    if base is not None and trained is not None:
        summary = f"Perplexity: {base:.1f} → {trained:.1f}"
        if pct is not None:
            word = "improvement" if pct >= 0 else "worse"
            summary += f" ({abs(pct):.0f}% {word})"
    check = job.resume_check or {}
    val_step = (job.latest_metrics or {}).get("val_loss_step")
    return {
        "val_loss": job.final_val_loss,
        "val_loss_label": _val_loss_label(val_step),
        "baseline": base,
        "trained": trained,
        "pct": pct,
        "summary": summary,
        "resume_check": check,
        "resume_rows": [(label, _number(check[k])) for k, label in RESUME_FIELDS if k in check],
    }


def _configuration(job: TrainingJob) -> dict:
    config = job.configuration or {}
    changed = {c.get("field") for c in job.retry_changes or []}
    hp = config.get("hyperparameters", {})
    return {
        "hyperparameters": [
            {"key": k, "value": _number(v), "changed": k in changed} for k, v in hp.items()
        ],
        "effective_batch": (hp.get("micro_batch_size") or 0)
        * (hp.get("gradient_accumulation_steps") or 0),
        "run": [
            {"label": label, "value": _number(config.get(k)), "changed": k in changed}
            for k, label in RUN_SETTINGS
            if k in config
        ],
    }


def _events(job: TrainingJob, event_type: str) -> list[WebhookEvent]:
    events = WebhookEvent.objects.filter(job=job)
    if event_type:
        events = events.filter(type=event_type)
    events = list(events.order_by("-received_at", "-id")[:EVENT_LIMIT])
    for event in events:
        data = (event.payload or {}).get("data") or {}
        event.pretty = json.dumps(event.payload, indent=2, sort_keys=True, default=str)
        event.summary = _event_summary(event.type, data)
    return events


def _event_summary(kind: str, data: dict) -> str:
    if kind == "metrics":
        parts = [f"step {data.get('step')}"]
        if data.get("train_loss") is not None:
            parts.append(f"loss {_number(data['train_loss'])}")
        if data.get("val_loss") is not None:
            parts.append(f"val {_number(data['val_loss'])}")
        return " · ".join(parts)
    if kind == "stage":
        return str(data.get("stage", ""))
    if kind in ("error", "warning"):
        return str(data.get("error_type") or data.get("code") or "") + (
            f": {data['message']}" if data.get("message") else ""
        )
    if kind == "checkpoint":
        return f"step {data.get('step')}"
    if kind == "heartbeat":
        return f"step {data.get('step')} · {data.get('stage', '')}".strip(" ·")
    if kind == "resume_check":
        return "passed" if data.get("passed") else f"failed: {data.get('message', '')}"
    if kind == "dataset":
        return (
            f"{data.get('conversations', '?')} conversations, {data.get('total_steps', '?')} steps"
        )
    if kind == "completed":
        ppl = data.get("perplexity") or {}
        if ppl.get("baseline") and ppl.get("trained"):
            return f"perplexity {ppl['baseline']:.1f} → {ppl['trained']:.1f}"
    if kind == "stopped":
        return str(data.get("reason", ""))
    return ""


def _job_or_404(job_id) -> TrainingJob:
    job = (
        TrainingJob.objects.for_list()
        .select_related("retry_of")
        .prefetch_related("transitions", "recoveries", "artifacts", "retries")
        .filter(pk=job_id)
        .first()
    )
    if job is None:
        raise Http404("No such training job.")
    return job


def _dataset(job: TrainingJob) -> list[tuple[str, str]]:
    report = job.dataset_report or {}
    return [(label, _number(report[k])) for k, label in DATASET_FIELDS if k in report]


def dataset_summary(job: TrainingJob) -> str:
    """The file's counts and the job's split in one set of units, e.g. "45 conversations
    (120 assistant turns); 36 for training, 9 held out for validation"."""
    report = job.dataset_report or {}
    file = job.training_file
    conversations = report.get("conversations", file.conversation_count)
    text = f"{conversations:,} conversation{'s' if conversations != 1 else ''}"
    if file.pair_count:
        text += f" ({file.pair_count:,} assistant turn{'s' if file.pair_count != 1 else ''})"
    if "train_conversations" in report:
        text += (
            f"; {report['train_conversations']:,} for training, "
            f"{report.get('val_conversations', 0):,} held out for validation"
        )
    return text


def _cost(job: TrainingJob) -> dict:
    """Cost so far against the estimate (billing's figures: training/hooks.py's Pricing), for
    the status card; the job's own fields when no figures are registered."""
    pricing = hooks.pricing()
    try:
        detail = pricing.job_cost(job_id=job.pk) if pricing is not None else {}
    except CrucibleError:
        detail = {}
    accrued = detail.get("accrued")
    if accrued is None or (not accrued and job.cost_actual):
        accrued = job.cost_actual
    estimate = detail.get("estimate") or job.cost_estimate
    variance = detail.get("variance_pct")
    if variance is None and estimate:
        variance = round(100 * (float(accrued) / float(estimate) - 1), 1)
    return {
        "accrued": accrued,
        "estimate": estimate,
        "estimate_text": detail.get("estimate_text", ""),
        "variance_pct": variance,
        # Seed: a warning indicator past 20% over the estimate (billing's configured limit).
        "warning": bool(detail.get("warning"))
        or (variance is not None and variance > 20 and bool(estimate)),
        "rate": detail.get("rate_per_hour"),
        "spot": detail.get("spot", job.spot),
        "projection": (detail.get("projection") or {}).get("final_cost"),
    }


def _live_context(job: TrainingJob, now: datetime) -> dict:
    return {
        "job": _decorate(job, now),
        "latest": _latest_metrics(job),
        "cost": _cost(job),
        "refresh_s": LIVE_REFRESH_S,
    }


@dashboard_view
def detail(request: HttpRequest, job_id) -> HttpResponse:
    part = request.GET.get("part", "")
    live = request.GET.get("live") == "1"
    now = timezone.now()

    if request.htmx and part in ("status", "latest"):
        job = TrainingJob.objects.for_list().filter(pk=job_id).first()
        if job is None:
            raise Http404("No such training job.")
        if not (live and job.is_terminal and part == "status"):
            context = _live_context(job, now)
            if live and part == "status":
                event_type = request.GET.get("event_type", "")[:32]
                # The stage badge, the stage list and the event log follow along (oob swaps).
                context |= {
                    "oob": True,
                    "timeline": _timeline(job, now),
                    "dataset": _dataset(job),
                    "dataset_summary": dataset_summary(job),
                    "events": _events(job, event_type),
                    "event_type": event_type,
                }
            response = render(request, f"training/detail.html#{part}", context)
            patch_vary_headers(response, ["HX-Request"])
            return response
        # It finished while the page was open: swap the whole page body in place (results,
        # downloads, errors), without a reload.
        response = _detail_page(request, _job_or_404(job_id), now)
        response["HX-Retarget"] = "#content"
        response["HX-Reselect"] = "#content"
        response["HX-Reswap"] = "outerHTML"
        patch_vary_headers(response, ["HX-Request"])
        return response

    job = _job_or_404(job_id)
    event_type = request.GET.get("event_type", "")[:32]
    if _wants_partial(request, "event-log"):
        context = {
            "job": job,
            "events": _events(job, event_type),
            "event_type": event_type,
        }
        response = render(request, "training/detail.html#events", context)
        patch_vary_headers(response, ["HX-Request", "HX-Target"])
        return response
    return _detail_page(request, job, now, event_type=event_type)


def _detail_page(
    request: HttpRequest, job: TrainingJob, now: datetime, *, event_type: str = ""
) -> HttpResponse:
    _decorate(job, now)
    api = f"/api/v1/training/jobs/{job.pk}"
    artifacts = {a.kind: a for a in job.artifacts.all()}
    event_types = set(WebhookEvent.objects.filter(job=job).values_list("type", flat=True))
    if job.is_active or job.status == JobStatus.PENDING:
        # Types still to come can be picked while it runs (the worker's event table).
        event_types |= set(services._HANDLERS)
    event_types = sorted(event_types)
    can_run = request.user.has_perm("core.run_jobs")
    try:
        template_save_url = reverse("training:template_save", args=[job.pk])
    except NoReverseMatch:
        template_save_url = None
    context = {
        "section": "training",
        "can_run": can_run,
        "can_change": can_run and can_change(request.user, job),  # config/roles.py
        "api": api,
        "timeline": _timeline(job, now),
        **_live_context(job, now),
        "chart": {
            "url": reverse("training:chart", args=[job.pk]),
            "active": job.is_active or job.status == JobStatus.PENDING,
            # While it runs the x axis spans the planned steps, so the curve shows progress.
            "total_steps": job.total_steps if job.is_active else None,
            "refresh_ms": LIVE_REFRESH_S * 1000,
        },
        "error": _error(job),
        "results": _results(job),
        "config": _configuration(job),
        "dataset": _dataset(job),
        "dataset_summary": dataset_summary(job),
        "recoveries": list(job.recoveries.all()),
        "retries": list(job.retries.all()),
        "artifacts": artifacts,
        "events": _events(job, event_type),
        "event_type": event_type,
        "event_types": event_types,
        "downloads": [
            ("Adapter (ZIP)", f"{api}/download/adapters", "PEFT adapter and a usage README"),
            ("Metrics (CSV)", f"{api}/download/metrics?format=csv", "Every logged step"),
            (
                "Deployment package",
                f"{api}/download/deployment-package",
                "Adapter, inference script, example prompts",
            ),
        ],
        "index_url": reverse("training:index"),
        "template_save_url": template_save_url,
        "new_from_job_url": f"{reverse('training:new')}?from_job={job.pk}",
        "switch_url": (
            f"{api}/switch-to-on-demand" if job.error_type == "GPUProvisioningError" else None
        ),
        "annotate_url": reverse("training:annotate", args=[job.pk]),
        "tags_text": ", ".join(job.tags or []),
    }
    return render(request, "training/detail.html", context)


@dashboard_view
def chart_data(request: HttpRequest, job_id) -> JsonResponse:
    """The loss and learning-rate series of a job, downsampled (training.charts)."""
    job = (
        TrainingJob.objects.filter(pk=job_id)
        .only("id", "status", "total_steps", "completed_at", "attempt")
        .first()
    )
    if job is None:
        return JsonResponse(
            {"error": {"code": "not_found", "message": "No such training job."}}, status=404
        )
    try:
        points = int(request.GET.get("points", charts.DEFAULT_POINTS))
        after = request.GET.get("after")
        after = int(after) if after not in (None, "") else None
    except ValueError:
        return JsonResponse(
            {"error": {"code": "invalid_input", "message": "points and after are whole numbers."}},
            status=400,
        )
    response = JsonResponse(charts.chart_series(job, points=points, after=after))
    response["Cache-Control"] = "private, no-cache"
    return response


@require_POST
@dashboard_view
def annotate(request: HttpRequest, job_id) -> HttpResponse:
    """Edit a job's notes and tags (engineers and admins), from the job's page."""
    if not request.user.has_perm("core.run_jobs"):
        return render(request, "403.html", {"action": "edit jobs"}, status=403)
    job = TrainingJob.objects.filter(pk=job_id).first()
    if job is None:
        raise Http404("No such training job.")
    if not can_change(request.user, job):
        return render(request, "403.html", {"action": "edit other people's jobs"}, status=403)
    form = AnnotateForm(request.POST)
    if form.is_valid():
        job.notes = form.cleaned_data["notes"]
        job.tags = form.tag_list()
        job.save(update_fields=["notes", "tags", "updated_at"])
    context = {
        "job": job,
        "can_run": True,
        "can_change": True,
        "annotate_url": reverse("training:annotate", args=[job.pk]),
        "tags_text": request.POST.get("tags", "") if form.errors else ", ".join(job.tags),
        "annotate_errors": [e for errors in form.errors.values() for e in errors],
        "annotate_saved": not form.errors,
    }
    if request.htmx:
        return render(
            request,
            "training/detail.html#annotations",
            context,
            status=400 if form.errors else 200,
        )
    if form.errors:
        messages.error(request, " ".join(context["annotate_errors"]))
    else:
        messages.success(request, "Notes and tags saved.")
    return redirect("training:detail", job_id=job.pk)


# --- New job ---------------------------------------------------------------------------------

PREVIEW_ROWS = 5
PREVIEW_CHARS = 400


def _run_jobs_or_403(request: HttpRequest) -> HttpResponse | None:
    if request.user.has_perm("core.run_jobs"):
        return None
    return render(request, "403.html", {"action": "start training jobs"}, status=403)


def _file_preview(training_file) -> list[dict]:
    """The first rows of the file as stored (a few lines, each shortened), for the form."""
    rows = []
    try:
        with storage_open(training_file.storage_path) as handle:
            for number, line in enumerate(handle, start=1):
                text = line.decode("utf-8", "replace").rstrip("\n")
                short = text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + " …"
                rows.append({"line": number, "text": short})
                if number >= PREVIEW_ROWS:
                    break
    except (OSError, ValueError):
        logger.warning("training file %s could not be read for a preview", training_file.pk)
    return rows


def _file_check(training_file) -> dict | None:
    if training_file is None:
        return None
    problems = training_file.validation_errors or []
    return {
        "file": training_file,
        "ready": training_file.is_ready,
        "problems": problems[:5],
        "more": max(0, len(problems) - 5),
        "preview": [] if training_file.is_ready else _file_preview(training_file),
    }


def _estimate(form: NewJobForm) -> dict:
    """The live estimate of a (possibly incomplete) form: figures, or why there are none."""
    if not form.is_valid():
        if "training_file" in form.errors and not form.data.get("training_file"):
            return {"error": "Choose a training file to see the duration and cost."}
        for name, errors in form.errors.items():
            label = form.fields[name].label if name in form.fields else ""
            label = label or name.replace("_", " ").capitalize()
            return {"error": f"{label}: {errors[0]}" if name != "__all__" else errors[0]}
        return {"error": "Complete the form to see an estimate."}
    pricing = hooks.pricing()
    if pricing is None:
        return {"error": "Cost estimates are not available on this installation."}
    data = form.cleaned_data
    try:
        est = pricing.estimate(
            training_file=data["training_file"],
            base_model=data["base_model"],
            preset=data["preset"],
            overrides=form.overrides(),
            gpu_type=form.gpu_type_key,
            spot=form.spot,
            executor=data["executor"],
        )
    except CrucibleError as exc:
        return {"error": exc.message}
    d = est.duration_seconds
    spot_cost, demand_cost = est.cost_spot, est.cost_on_demand
    savings = round(100 * (1 - est.rate_spot / est.rate_on_demand)) if est.rate_on_demand else None
    expected = est.recovery_seconds.get("expected_interruptions", 0.0)
    runpod = data["executor"] == TrainingJob.Executor.RUNPOD
    return {
        "text": est.text,
        "duration": f"{format_duration(d['low'])} to {format_duration(d['high'])}",
        "point_duration": format_duration(d["point"]),
        "cost": est.cost,
        "cost_spot": spot_cost,
        "cost_on_demand": demand_cost,
        "free": est.rate_spot == 0 and est.rate_on_demand == 0,
        "spot": est.spot,
        "runpod": runpod,
        "gpu_type": est.gpu_type,
        "rate": est.rate_spot if est.spot else est.rate_on_demand,
        "rate_spot": est.rate_spot,
        "rate_on_demand": est.rate_on_demand,
        "savings_pct": savings,
        "interruption_pct": round(100 * (1 - math.exp(-expected))) if runpod else None,
        "steps": est.steps,
        "train_tokens": est.train_tokens,
        "basis": est.basis,
        "history_jobs": est.history_jobs,
    }


def _review(form: NewJobForm) -> dict:
    data = form.cleaned_data
    hp = form.configuration["hyperparameters"]
    overridden = set(form.overrides())
    preset_hp = data["preset"].hyperparameters
    return {
        "name": data["name"].strip()
        or f"{data['base_model'].display_name} on {data['training_file'].name}",
        "tags": form.tag_list(),
        "hyperparameters": [
            {
                "key": k,
                "value": _number(v),
                "changed": k in overridden,
                "preset_value": _number(preset_hp.get(k)),
            }
            for k, v in hp.items()
        ],
        "effective_batch": hp["micro_batch_size"] * hp["gradient_accumulation_steps"],
    }


def _template_initial(request: HttpRequest) -> dict:
    """Initial values from ``?template=<id>``, ``?from_job=<id>`` or ``?training_file=<id>``."""
    initial: dict = {}
    source = None
    if template_id := request.GET.get("template", "").strip():
        if template_id.isdigit():
            source = JobTemplate.objects.filter(pk=template_id).first()
        if source is not None:
            initial |= {
                "training_file": source.training_file_id,
                "notes": source.notes,
                "tags": ", ".join(source.tags or []),
            }
    elif job_id := request.GET.get("from_job", "").strip():
        try:
            source = TrainingJob.objects.filter(pk=uuid.UUID(job_id)).first()
        except ValueError:
            source = None
        if source is not None:
            initial |= {
                "training_file": source.training_file_id,
                "notes": source.notes,
                "tags": ", ".join(source.tags or []),
                "description": source.description,
            }
    if source is None:
        chosen = None
        if file_id := request.GET.get("training_file", "").strip():  # "Train on this file"
            try:
                chosen = TrainingFile.objects.filter(pk=uuid.UUID(file_id)).first()
            except ValueError:
                chosen = None
        chosen = chosen or TrainingFile.objects.ready().order_by("-created_at").first()
        return {"training_file": chosen.pk} if chosen else {}
    overrides = getattr(source, "overrides", None)
    if overrides is None:  # a job: its resolved configuration against its preset
        preset_hp = source.preset.hyperparameters if source.preset else {}
        hp = (source.configuration or {}).get("hyperparameters", {})
        overrides = {k: v for k, v in hp.items() if preset_hp.get(k) != v}
    initial |= {
        "base_model": source.base_model.name,
        "executor": source.executor,
        "gpu_type": source.gpu_type or None,
        "capacity": "spot" if source.spot else "on_demand",
    }
    if source.preset:
        initial["preset"] = source.preset.key
    advanced = {f"hp_{k}": v for k, v in overrides.items() if k in ADVANCED_FIELDS}
    if advanced:
        initial |= {"advanced": True, **advanced}
    return {k: v for k, v in initial.items() if v not in (None, "")}


@dashboard_view
def new_job(request: HttpRequest) -> HttpResponse:
    refused = _run_jobs_or_403(request)
    if refused is not None:
        return refused
    stage = "edit"
    start_error = None
    if request.method == "POST":
        form = NewJobForm(request.POST)
        action = request.POST.get("action", "review")
        if action != "edit" and form.is_valid():
            stage = "review"
            if action == "start":
                data = form.cleaned_data
                try:
                    with transaction.atomic():
                        job = services.training_job_create(
                            user=request.user,
                            training_file=data["training_file"],
                            base_model=data["base_model"],
                            preset=data["preset"],
                            name=data["name"],
                            overrides=form.overrides(),
                            executor=data["executor"],
                            description=data["description"],
                            notes=data["notes"],
                            tags=form.tag_list(),
                            gpu_type=form.gpu_type_key,
                            spot=form.spot,
                        )
                        services.training_job_start(
                            job=job,
                            user=request.user,
                            override_reason=data["override_reason"].strip(),
                        )
                except CrucibleError as exc:
                    start_error = exc.message
                else:
                    messages.success(request, f"“{job.name}” is queued; it starts in a moment.")
                    return redirect("training:detail", job_id=job.pk)
        elif action == "edit":
            # Back from the review: the same values, editable, without error messages.
            form = NewJobForm(initial=request.POST.dict())
    elif request.htmx and request.GET.get("part") == "estimate":
        form = NewJobForm(request.GET)
        context = {
            "estimate": _estimate(form),
            "file_check": _file_check(_selected_file(form)),
            "presets": preset_cards(form),
            "oob": True,
        }
        response = render(request, "training/new.html#estimate", context)
        patch_vary_headers(response, ["HX-Request"])
        return response
    else:
        form = NewJobForm(initial=_template_initial(request))

    bound = form if form.is_bound else NewJobForm({**_initial_data(form)})
    context = {
        "section": "training",
        "form": form,
        "stage": stage,
        "start_error": start_error,
        "presets": preset_cards(bound),
        "estimate": _estimate(bound),
        "file_check": _file_check(_selected_file(bound)),
        "review": _review(form) if stage == "review" else None,
        "runpod_available": runpod_available(),
        "can_override": request.user.has_perm("core.override_budgets"),
        "has_files": TrainingFile.objects.exists(),
        "index_url": reverse("training:index"),
    }
    status = 200
    if request.method == "POST" and (form.errors or start_error):
        status = 400 if form.errors else 409
    return render(request, "training/new.html", context, status=status)


def _initial_data(form: NewJobForm) -> dict:
    """An unbound form's initial values as submitted data (to estimate the defaults)."""
    data = {}
    for name, field in form.fields.items():
        value = form.initial.get(name, field.initial)
        if value is None:
            continue
        data[name] = "on" if value is True else value
    return {k: v for k, v in data.items() if v is not False}


def _selected_file(form: NewJobForm):
    value = form.data.get("training_file") if form.is_bound else None
    if not value:
        return None
    try:
        return TrainingFile.objects.filter(pk=uuid.UUID(str(value))).first()
    except ValueError:
        return None
