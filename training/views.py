"""Training pages: the job list and one job's page, with htmx partials for the live parts.

Actions (cancel, retry) and downloads go through the JSON API (/api/v1/training/...), which
accepts the browser session; these views only read.
"""

from __future__ import annotations

import json
from datetime import datetime

from django.core.paginator import Paginator
from django.db.models import Avg, Count, F, Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import patch_vary_headers

from config.views import dashboard_view
from training.models import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    JobStatus,
    MetricPoint,
    Preset,
    TrainingJob,
    WebhookEvent,
)

PAGE_SIZE = 25
EVENT_LIMIT = 50
CHART_MAX_POINTS = 2000
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
    ("val_conversations", "Validation conversations"),
    ("train_examples", "Training examples"),
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


def _list_filters(request: HttpRequest) -> dict:
    status = request.GET.get("status", "")
    if status not in dict(STATUS_FILTERS):
        status = ""
    return {
        "status": status,
        "q": request.GET.get("q", "").strip()[:200],
        "preset": request.GET.get("preset", "").strip()[:32],
    }


def _filtered_jobs(filters: dict):
    jobs = TrainingJob.objects.for_list()
    if filters["status"] == "active":
        jobs = jobs.active()
    elif filters["status"]:
        jobs = jobs.filter(status=filters["status"])
    if filters["preset"]:
        jobs = jobs.filter(preset__key=filters["preset"])
    if filters["q"]:
        q = filters["q"]
        jobs = jobs.filter(Q(name__icontains=q) | Q(notes__icontains=q) | Q(tags__icontains=q))
    return jobs.order_by("-created_at", "-id")


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


@dashboard_view
def index(request: HttpRequest) -> HttpResponse:
    filters = _list_filters(request)
    page = Paginator(_filtered_jobs(filters), PAGE_SIZE).get_page(request.GET.get("page"))
    now = timezone.now()
    jobs = [_decorate(job, now) for job in page.object_list]
    context = {
        "section": "training",
        "page": page,
        "jobs": jobs,
        "filters": filters,
        "filtered": any(filters.values()),
        "any_active": any(job.is_active for job in jobs),
        "refresh_s": LIVE_REFRESH_S,
        "can_run": request.user.has_perm("core.run_jobs"),
    }
    if _wants_partial(request, "training-jobs"):
        response = render(request, "training/index.html#job-table", context)
    else:
        context |= {
            "status_filters": STATUS_FILTERS,
            "presets": list(Preset.objects.only("key", "name")),
            "summary": _summary(),
        }
        response = render(request, "training/index.html", context)
    patch_vary_headers(response, ["HX-Request", "HX-Target"])
    return response


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


def _chart_points(job: TrainingJob) -> list[dict]:
    rows = list(
        MetricPoint.objects.filter(job=job)
        .order_by("step")
        .values_list("step", "train_loss", "val_loss", "learning_rate")
    )
    if len(rows) > CHART_MAX_POINTS:
        # Keep every evaluation and the last point; thin the per-step training loss.
        stride = -(-len(rows) // CHART_MAX_POINTS)
        last = len(rows) - 1
        rows = [r for i, r in enumerate(rows) if i % stride == 0 or i == last or r[2] is not None]
    return [
        {"step": s, "train_loss": t, "val_loss": v, "learning_rate": lr} for s, t, v, lr in rows
    ]


def _latest_metrics(job: TrainingJob) -> list[tuple[str, str]]:
    m = job.latest_metrics or {}
    memory = m.get("gpu_memory_mb")
    rows = [
        ("Step", _number(m.get("step"))),
        ("Epoch", f"{m['epoch']:.2f}" if m.get("epoch") is not None else "—"),
        ("Train loss", _number(m.get("train_loss"))),
        ("Validation loss", _number(m.get("val_loss"))),
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
        summary = f"Perplexity: {base:.1f} -> {trained:.1f}"
        if pct is not None:
            word = "improvement" if pct >= 0 else "worse"
            summary += f" ({abs(pct):.0f}% {word})"
    check = job.resume_check or {}
    return {
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
            return f"perplexity {ppl['baseline']:.1f} -> {ppl['trained']:.1f}"
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


@dashboard_view
def detail(request: HttpRequest, job_id) -> HttpResponse:
    part = request.GET.get("part", "")
    live = request.GET.get("live") == "1"
    now = timezone.now()

    if request.htmx and part in ("status", "latest"):
        job = TrainingJob.objects.for_list().filter(pk=job_id).first()
        if job is None:
            raise Http404("No such training job.")
        if live and job.is_terminal and part == "status":
            # It finished while the page was open: reload it whole (results, errors...).
            response = HttpResponse(status=204)
            response["HX-Refresh"] = "true"
            return response
        context = {
            "job": _decorate(job, now),
            "latest": _latest_metrics(job),
            "refresh_s": LIVE_REFRESH_S,
        }
        response = render(request, f"training/detail.html#{part}", context)
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

    _decorate(job, now)
    api = f"/api/v1/training/jobs/{job.pk}"
    artifacts = {a.kind: a for a in job.artifacts.all()}
    event_types = sorted(
        WebhookEvent.objects.filter(job=job).values_list("type", flat=True).distinct()
    )
    can_run = request.user.has_perm("core.run_jobs")
    context = {
        "section": "training",
        "job": job,
        "can_run": can_run,
        "refresh_s": LIVE_REFRESH_S,
        "api": api,
        "timeline": _timeline(job, now),
        "latest": _latest_metrics(job),
        "chart": {
            "points": _chart_points(job),
            "metrics_url": f"{api}/metrics" if job.is_active else None,
            # While it runs the x axis spans the planned steps, so the curve shows progress.
            "total_steps": job.total_steps if job.is_active else None,
            "refresh_ms": LIVE_REFRESH_S * 1000,
        },
        "error": _error(job),
        "results": _results(job),
        "config": _configuration(job),
        "dataset": [
            (label, _number(job.dataset_report[k]))
            for k, label in DATASET_FIELDS
            if k in (job.dataset_report or {})
        ],
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
    }
    return render(request, "training/detail.html", context)
