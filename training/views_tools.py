"""Training tools pages: compare jobs, job templates and the playground (base vs adapter).

One view per page; htmx partials live inside the page templates. Writes (save a template,
start from a template, run a playground prompt) need the ``core.run_jobs`` capability and
answer 403 otherwise; every page is readable by any dashboard role. The same workflows are
in the JSON API (training/api_tools.py); both call training/services.py.
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

from django.contrib import messages
from django.db.models import Count, Exists, F, OuterRef, Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import patch_vary_headers

from config.errors import CrucibleError
from config.storage import storage_open
from config.views import dashboard_view
from corpora.models import TrainingFile
from training import playground as playground_lib
from training import services
from training.models import (
    TERMINAL_STATUSES,
    Artifact,
    JobStatus,
    JobTemplate,
    PlaygroundRun,
    TrainingJob,
)
from training.views import _number, format_duration

SECTION = "training_tools"
PICKER_LIMIT = 60
RECENT_RUNS = 8
POLL_MS = 1000
# One colour per compared job (colour-blind safe: Okabe-Ito), in selection order.
JOB_COLOURS = ["#4f46e5", "#d55e00", "#009e73", "#cc79a7"]

DISPLAY = {
    "final_train_loss": lambda v: f"{v:.4f}",
    "final_val_loss": lambda v: f"{v:.4f}",
    "perplexity_baseline": lambda v: f"{v:.2f}",
    "perplexity_trained": lambda v: f"{v:.2f}",
    "perplexity_improvement_pct": lambda v: f"{v:.1f}%",
    "cost": lambda v: f"${v:,.2f}",
    "duration_seconds": format_duration,
    "steps": lambda v: f"{v:,}",
}
METRIC_LABELS = {
    "perplexity_improvement_pct": "Perplexity improvement",
    "cost": "Cost",
    "duration_seconds": "Duration",
}


def _forbidden(request: HttpRequest, message: str = "Your role can't do this.") -> HttpResponse:
    return render(request, "403.html", {"reason": message}, status=403)


def _can_run(request: HttpRequest) -> bool:
    return request.user.has_perm("core.run_jobs")


def _error_text(exc: CrucibleError) -> tuple[str, dict]:
    fields = {f.get("field"): f.get("message") for f in (exc.details or {}).get("fields", []) or []}
    return exc.message, fields


# --- Compare -------------------------------------------------------------------------------


def _picker_jobs(selected: list[str]) -> list[TrainingJob]:
    """Recent finished jobs (completed, failed or cancelled: a diverged run's curve is worth
    comparing too) for the selection list, plus any selected."""
    jobs = list(
        TrainingJob.objects.for_list()
        .filter(Q(status__in=TERMINAL_STATUSES) | Q(pk__in=_valid_uuids(selected)))
        .order_by(F("completed_at").desc(nulls_last=True), "-created_at")[:PICKER_LIMIT]
    )
    for job in jobs:
        job.picked = str(job.pk) in selected
    return jobs


def _valid_uuids(values: list[str]) -> list[str]:
    import uuid

    out = []
    for value in values:
        try:
            out.append(str(uuid.UUID(value)))
        except ValueError:
            continue
    return out


def _comparison_view_model(comparison: dict) -> dict:
    jobs = comparison["jobs"]
    for i, job in enumerate(jobs):
        job["colour"] = JOB_COLOURS[i % len(JOB_COLOURS)]
        job["url"] = reverse("training:detail", args=[job["id"]])
    metrics = []
    for metric in comparison["metrics"]:
        fmt = DISPLAY.get(metric["key"], _number)
        cells = [
            {
                "text": "—" if v is None else fmt(v),
                "best": best,
                "raw": v,
            }
            for v, best in zip(metric["values"], metric["best"], strict=True)
        ]
        hint = (
            ""
            if metric["lower_is_better"] is None
            else ("lower is better" if metric["lower_is_better"] else "higher is better")
        )
        metrics.append(
            {
                "key": metric["key"],
                "label": METRIC_LABELS.get(metric["key"], metric["label"]),
                "hint": hint,
                "cells": cells,
            }
        )
    hyperparameters = [
        {
            "key": hp["key"],
            "differs": hp["differs"],
            "cells": [_number(v) for v in hp["values"]],
        }
        for hp in comparison["hyperparameters"]
    ]
    chart = {
        "jobs": [
            {
                "name": j["name"],
                "colour": j["colour"],
                "train": j["train_loss"],
                "val": j["val_loss"],
            }
            for j in jobs
        ]
    }
    return {
        "jobs": jobs,
        "metrics": metrics,
        "hyperparameters": hyperparameters,
        "differing": sum(1 for hp in hyperparameters if hp["differs"]),
        "chart": chart,
        "has_points": any(j["train_loss"] or j["val_loss"] for j in jobs),
    }


@dashboard_view
def compare(request: HttpRequest) -> HttpResponse:
    selected = list(dict.fromkeys(v for v in request.GET.getlist("jobs") if v))
    context = {"section": SECTION, "selected": selected, "error": "", "first_job": None}
    status = 200
    if len(selected) == 1:
        # Not an error: one job is half a selection. Name it and ask for a second one.
        ids = _valid_uuids(selected)
        context["first_job"] = (
            TrainingJob.objects.filter(pk=ids[0]).only("id", "name").first() if ids else None
        )
        if context["first_job"] is None:
            context["error"] = "That job does not exist or its id is not valid; pick 2 to 4 jobs."
            status = 400
    elif selected:
        try:
            comparison = services.training_jobs_compare(job_ids=selected)
        except CrucibleError as exc:
            context["error"] = exc.message
            status = 400
        else:
            context["comparison"] = _comparison_view_model(comparison)
            query = urlencode([("jobs", j) for j in selected])
            context["csv_url"] = f"/api/v1/training/compare/csv?{query}"
    context["picker"] = _picker_jobs(selected)
    context["max_jobs"] = services.COMPARE_MAX_JOBS
    return render(request, "training/compare.html", context, status=status)


# --- Templates -----------------------------------------------------------------------------


def _template_rows() -> list[JobTemplate]:
    templates = list(
        JobTemplate.objects.select_related(
            "base_model", "preset", "training_file", "created_by", "source_job"
        ).order_by("name")
    )
    for t in templates:
        t.override_items = [(k, _number(v)) for k, v in sorted((t.overrides or {}).items())]
        t.file_ready = bool(t.training_file_id) and t.training_file.is_ready
        t.creator_name = (
            (t.created_by.get_full_name() or t.created_by.get_username())
            if t.created_by
            else "system"
        )
    return templates


@dashboard_view
def templates(request: HttpRequest) -> HttpResponse:
    rows = _template_rows()
    context = {
        "section": SECTION,
        "mode": "list",
        "templates": rows,
        "can_run": _can_run(request),
        "highlight": request.GET.get("saved", ""),
        "ready_files": TrainingFile.objects.ready().exists(),
    }
    return render(request, "training/templates.html", context)


@dashboard_view
def template_save(request: HttpRequest, job_id) -> HttpResponse:
    """GET: the "Save as template" form for a job; POST: save it (engineers and admins)."""
    job = TrainingJob.objects.for_list().filter(pk=job_id).first()
    if job is None:
        raise Http404("No such training job.")
    can_run = _can_run(request)
    form = {
        "name": request.POST.get("name", "").strip() if request.method == "POST" else "",
        "description": request.POST.get("description", "").strip()
        if request.method == "POST"
        else job.description,
        # Forms that show the checkbox say so (an unticked box sends nothing); a short form
        # elsewhere (the job page's menu) keeps the job's file.
        "include_training_file": request.POST.get("include_training_file") == "on"
        if request.method == "POST" and request.POST.get("file_choice_shown")
        else True,
    }
    context = {
        "section": SECTION,
        "mode": "save",
        "job": job,
        "can_run": can_run,
        "form": form,
        "error": "",
        "field_errors": {},
        "config_items": [
            (k, _number(v)) for k, v in services._flat_configuration(job.configuration).items()
        ],
    }
    if request.method == "POST":
        if not can_run:
            return _forbidden(request, "Only engineers and admins can save templates.")
        try:
            template = services.job_template_from_job(
                job=job,
                user=request.user,
                name=form["name"],
                description=form["description"],
                include_training_file=form["include_training_file"],
            )
        except CrucibleError as exc:
            context["error"], context["field_errors"] = _error_text(exc)
            return render(request, "training/templates.html", context, status=400)
        messages.success(request, f"Saved template “{template.name}”. The whole team can use it.")
        return redirect(
            f"{reverse('training:templates')}?saved={template.pk}#template-{template.pk}"
        )
    if not form["name"]:
        form["name"] = f"{job.name} template"
    return render(request, "training/templates.html", context)


@dashboard_view
def template_start(request: HttpRequest, template_id: int) -> HttpResponse:
    """GET: confirm a start (file preselected); POST: create and start the job."""
    template = (
        JobTemplate.objects.select_related("base_model", "preset", "training_file")
        .filter(pk=template_id)
        .first()
    )
    if template is None:
        raise Http404("No such template.")
    can_run = _can_run(request)
    files = list(TrainingFile.objects.ready().order_by("-created_at")[:100])
    default_file = services.job_template_default_file(template=template)
    context = {
        "section": SECTION,
        "mode": "start",
        "template": template,
        "can_run": can_run,
        "files": files,
        "selected_file": str(default_file.pk) if default_file else "",
        "job_name": f"{template.name} · {timezone.localtime():%Y-%m-%d %H:%M}",
        "override_items": [(k, _number(v)) for k, v in sorted((template.overrides or {}).items())],
        "error": "",
        "field_errors": {},
        "file_missing": bool(template.training_file_id) and not template.training_file.is_ready,
    }
    if request.method != "POST":
        return render(request, "training/templates.html", context)
    if not can_run:
        return _forbidden(request, "Only engineers and admins can start training jobs.")
    file_id = request.POST.get("training_file", "").strip()
    context["selected_file"] = file_id
    context["job_name"] = request.POST.get("name", "").strip()[:255]
    training_file = None
    if file_id:
        ids = _valid_uuids([file_id])
        training_file = TrainingFile.objects.filter(pk=ids[0]).first() if ids else None
        if training_file is None:
            context["error"] = "That training file no longer exists; pick another one."
            context["field_errors"] = {"training_file_id": "not found"}
            return render(request, "training/templates.html", context, status=400)
    try:
        job = services.job_template_start(
            template=template,
            user=request.user,
            training_file=training_file,
            name=context["job_name"],
            start=True,
            override_reason=request.POST.get("override_reason", "").strip()[:500],
        )
    except CrucibleError as exc:
        context["error"], context["field_errors"] = _error_text(exc)
        status = exc.status_code if 400 <= exc.status_code < 500 else 400
        return render(request, "training/templates.html", context, status=status)
    messages.success(request, f"Started “{job.name}” from the template “{template.name}”.")
    return redirect("training:detail", job_id=job.pk)


# --- Playground ----------------------------------------------------------------------------


def _playground_jobs():
    has_adapter = Artifact.objects.filter(job=OuterRef("pk"), kind=Artifact.Kind.ADAPTER)
    return (
        TrainingJob.objects.for_list()
        .filter(status=JobStatus.COMPLETED)
        .filter(Exists(has_adapter))
        .annotate(run_count=Count("playground_runs"))
        .order_by("-completed_at", "-created_at")
    )


def _decorate_run(run: PlaygroundRun) -> PlaygroundRun:
    now = timezone.now()
    start = run.started_at or run.created_at
    end = run.completed_at or now
    run.elapsed_display = format_duration((end - start).total_seconds())
    run.waiting_s = (now - run.created_at).total_seconds() if run.status == "queued" else 0
    t = run.timings or {}
    run.timing_rows = [
        (label, f"{t[key]:.2f} s")
        for key, label in (
            ("load_base_s", "Load base model"),
            ("load_adapter_s", "Load adapter"),
            ("base_generate_s", "Base answer"),
            ("adapter_generate_s", "Adapter answer"),
        )
        if t.get(key) is not None
    ]
    tokens = run.token_counts or {}
    for side in ("base", "adapter"):
        seconds = t.get(f"{side}_generate_s")
        count = tokens.get(side)
        setattr(
            run,
            f"{side}_rate",
            f"{count / seconds:.1f} tok/s" if seconds and count else "",
        )
    d = run.decoding or {}
    run.decoding_text = (
        (
            f"sampling · temperature {d.get('temperature')} · top-p {d.get('top_p')}"
            if d.get("do_sample")
            else "greedy"
        )
        + f" · max {d.get('max_new_tokens')} new tokens"
        + f" · repetition penalty {d.get('repetition_penalty')} · seed {d.get('seed')}"
    )
    return run


def _playground_defaults() -> dict:
    from django.conf import settings

    return {
        "max_new_tokens": getattr(
            settings, "PLAYGROUND_MAX_NEW_TOKENS", playground_lib.DEFAULT_MAX_NEW_TOKENS
        ),
        "max_new_tokens_limit": getattr(
            settings, "PLAYGROUND_MAX_NEW_TOKENS_LIMIT", playground_lib.MAX_NEW_TOKENS_LIMIT
        ),
        "temperature": 0.0,
        "top_p": 1.0,
        "repetition_penalty": 1.1,
        "seed": 42,
        "prompt": "",
        "system_prompt": "",
    }


def _float(value: str, default: float) -> float | str:
    try:
        return float(value) if value.strip() != "" else default
    except ValueError:
        return value


def _int(value: str, default: int) -> int | str:
    try:
        return int(value) if value.strip() != "" else default
    except ValueError:
        return value


@dashboard_view
def playground(request: HttpRequest) -> HttpResponse:
    htmx = getattr(request, "htmx", None)
    if htmx and request.GET.get("part") == "run":
        ids = _valid_uuids([request.GET.get("run", "")])
        runs = PlaygroundRun.objects.select_related("job__base_model")
        run = runs.filter(pk=ids[0]).first() if ids else None
        if run is None:
            raise Http404("No such playground run.")
        response = render(
            request,
            "training/playground.html#run",
            {"run": _decorate_run(run), "poll_ms": POLL_MS},
        )
        patch_vary_headers(response, ["HX-Request"])
        return response

    jobs = list(_playground_jobs()[:100])
    job_id = request.POST.get("job") or request.GET.get("job") or ""
    job = next((j for j in jobs if str(j.pk) == job_id), None)
    if job is None and jobs and not job_id:
        job = jobs[0]
    can_run = _can_run(request)
    form = _playground_defaults()
    examples = _training_examples(job) if job is not None else {"system": "", "prompts": []}
    context = {
        "section": SECTION,
        "examples": examples["prompts"],
        "jobs": jobs,
        "job": job,
        "job_missing": bool(job_id) and job is None,
        "can_run": can_run,
        "form": form,
        "error": "",
        "field_errors": {},
        "poll_ms": POLL_MS,
    }

    if request.method == "POST":
        if not can_run:
            return _forbidden(request, "Only engineers and admins can run the playground.")
        form |= {
            "prompt": request.POST.get("prompt", ""),
            "system_prompt": request.POST.get("system_prompt", ""),
            "max_new_tokens": _int(request.POST.get("max_new_tokens", ""), form["max_new_tokens"]),
            "temperature": _float(request.POST.get("temperature", ""), 0.0),
            "top_p": _float(request.POST.get("top_p", ""), 1.0),
            "repetition_penalty": _float(request.POST.get("repetition_penalty", ""), 1.1),
            "seed": _int(request.POST.get("seed", ""), 42),
        }
        problems = {
            k: "Enter a number."
            for k in ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed")
            if isinstance(form[k], str)
        }
        run = None
        if job is None:
            context["error"] = "Pick a completed job with an adapter."
            context["field_errors"] = {"job": "required"}
        elif problems:
            context["error"] = "Some settings are not numbers."
            context["field_errors"] = problems
        else:
            try:
                run = services.playground_run_create(
                    job=job,
                    user=request.user,
                    prompt=form["prompt"],
                    system_prompt=form["system_prompt"],
                    max_new_tokens=form["max_new_tokens"],
                    temperature=form["temperature"],
                    top_p=form["top_p"],
                    repetition_penalty=form["repetition_penalty"],
                    seed=form["seed"],
                )
            except CrucibleError as exc:
                context["error"], context["field_errors"] = _error_text(exc)
                if context["field_errors"]:
                    count = len(context["field_errors"])
                    context["error"] = (
                        "Check the highlighted field."
                        if count == 1
                        else f"Check the {count} highlighted fields."
                    )
        if run is None:
            template = "training/playground.html#form" if htmx else "training/playground.html"
            if not htmx:
                context["runs"] = _recent_runs(job)
            return render(request, template, context, status=400)
        if htmx:
            run.job = job
            context["run"] = _decorate_run(run)
            context["form"] = form | {"prompt": form["prompt"]}
            response = render(request, "training/playground.html#form", context)
            response["HX-Push-Url"] = f"{reverse('training:playground')}?job={job.pk}&run={run.pk}"
            return response
        return redirect(f"{reverse('training:playground')}?job={job.pk}&run={run.pk}")

    run = None
    run_id = _valid_uuids([request.GET.get("run", "")])
    if run_id and job is not None:
        run = PlaygroundRun.objects.filter(pk=run_id[0], job=job).first()
    if run is not None:
        run.job = job
        context["run"] = _decorate_run(run)
        form |= {
            "prompt": run.prompt,
            "system_prompt": run.system_prompt,
            **{k: v for k, v in (run.decoding or {}).items() if k in form},
        }
    if run is None and job is not None:
        form["system_prompt"] = examples["system"]
    context["runs"] = _recent_runs(job)
    status = 404 if context["job_missing"] else 200
    return render(request, "training/playground.html", context, status=status)


def _recent_runs(job: TrainingJob | None) -> list[PlaygroundRun]:
    if job is None:
        return []
    return [
        _decorate_run(r)
        for r in PlaygroundRun.objects.filter(job=job).order_by("-created_at")[:RECENT_RUNS]
    ]


def _training_examples(job: TrainingJob, limit: int = 4) -> dict:
    """The system prompt and a few user prompts from the job's training file (its first
    lines), so a prompt in the adapter's domain is one click away."""
    system, prompts = "", []
    try:
        with storage_open(job.training_file.storage_path) as handle:
            for _ in range(limit):
                line = handle.readline(256 * 1024)
                if not line:
                    break
                record = json.loads(line)
                system = system or str(record.get("system_prompt") or "")
                pairs = record.get("training_pairs") or []
                if pairs and pairs[0].get("user_input"):
                    prompts.append(str(pairs[0]["user_input"])[:500])
    except (OSError, ValueError, AttributeError):
        pass  # the examples are a convenience; the page works without them
    return {"system": system, "prompts": prompts}
