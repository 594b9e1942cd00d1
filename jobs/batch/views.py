"""Batch job pages: the jobs list, the launcher (live estimate over htmx), a job's page
(live progress, error log, cost meter, pause/resume/cancel), the results viewer and a task's
drill-down. One view per page; htmx asks for a partial with ``?part=``."""

from __future__ import annotations

import contextlib
import json
from decimal import Decimal

from django.contrib import messages
from django.db.models import Count, Q, Sum
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from config.errors import CrucibleError
from config.views import dashboard_view
from corpora.models import Corpus
from jobs import gateway
from jobs.batch import results, services
from jobs.batch.models import BatchJob, BatchTask, FrameworkVersion
from jobs.models import GatewaySettings

SECTION = "batch"
REFRESH_S = 3
ERROR_ROWS = 50
TEXT_ROWS = 500


def _can_run(request: HttpRequest) -> bool:
    return request.user.has_perm("core.run_jobs")


def _forbidden(request: HttpRequest) -> HttpResponse:
    return render(request, "403.html", {"section": SECTION}, status=403)


@dashboard_view
def jobs_page(request: HttpRequest) -> HttpResponse:
    jobs = list(
        BatchJob.objects.frameworks()
        .select_related("created_by", "corpus")
        .annotate(
            finished=Count("tasks", filter=Q(tasks__status__in=("succeeded", "failed"))),
            failed_tasks=Count("tasks", filter=Q(tasks__status="failed")),
            spent=Sum("tasks__cost"),
        )
        .order_by("-created_at")[:100]
    )
    for job in jobs:
        job.percent = round(100 * job.finished / job.task_count) if job.task_count else 0
    context = {
        "section": SECTION,
        "jobs": jobs,
        "any_active": any(j.is_active for j in jobs),
        "can_run": _can_run(request),
        "refresh_s": REFRESH_S,
    }
    if request.htmx and request.GET.get("part") == "table":
        return render(request, "jobs/batch/jobs.html#job-table", context)
    return render(request, "jobs/batch/jobs.html", context)


def _launch_params(data) -> dict:
    documents = data.getlist("documents")
    flt = {}
    if data.get("document_type"):
        flt["document_type"] = data["document_type"]
    meta = [m.strip() for m in data.get("meta", "").split(",") if m.strip()]
    if meta:
        flt["meta"] = meta
    if documents:
        selection = {"document_ids": documents}
    elif flt:
        selection = {"filter": flt}
    else:
        selection = {}
    decoding = {}
    for key, cast in (("max_tokens", int), ("temperature", float)):
        if data.get(key) not in (None, ""):
            try:
                decoding[key] = cast(data[key])
            except ValueError:
                decoding[key] = data[key]
    try:
        runs = int(data.get("runs") or 0) or None
    except ValueError:
        runs = -1
    return {
        "corpus_id": data.get("corpus"),
        "selection": selection,
        "frameworks": data.getlist("frameworks"),
        "models": data.getlist("models"),
        "runs": runs,
        "decoding": decoding,
    }


@dashboard_view
def launcher_page(request: HttpRequest) -> HttpResponse:
    if not _can_run(request):
        return _forbidden(request)
    corpora = list(Corpus.objects.order_by("-created_at").only("pk", "name", "record_count"))
    data = request.POST if request.method == "POST" else request.GET
    chosen = data.get("corpus") or (str(corpora[0].pk) if corpora else "")
    corpus = next((c for c in corpora if str(c.pk) == chosen), None)
    documents = (
        list(
            corpus.documents.order_by("position").only(
                "external_id", "title", "author", "date", "document_type", "metadata"
            )[:TEXT_ROWS]
        )
        if corpus
        else []
    )
    context = {
        "section": SECTION,
        "corpora": corpora,
        "corpus": corpus,
        "documents": documents,
        "document_types": sorted({d.document_type for d in documents if d.document_type}),
        "frameworks": _frameworks(),
        "models": list(gateway.models("chat").order_by("key")),
        "default_runs": GatewaySettings.load().default_runs,
        "values": data,
        "checked": set(data.getlist("documents")),
        "checked_frameworks": set(data.getlist("frameworks")),
        "checked_models": set(data.getlist("models")),
    }
    part = data.get("part")
    if request.method == "POST":
        params = _launch_params(request.POST)
        params["corpus_id"] = chosen
        if part == "estimate":
            try:
                context["plan"] = services.job_plan(**params).as_dict()
            except CrucibleError as exc:
                context["estimate_error"] = exc.message
            return render(request, "jobs/batch/launch.html#estimate", context)
        try:
            job = services.job_create(
                user=request.user, name=request.POST.get("name", ""), **params
            )
        except CrucibleError as exc:
            context["launch_error"] = exc.message
            return render(request, "jobs/batch/launch.html", context, status=exc.status_code)
        messages.success(request, f"Job started: {job.task_count} tasks.")
        return redirect("batch:job", job_id=job.pk)
    if request.htmx and part == "texts":
        return render(request, "jobs/batch/launch.html#texts", context)
    return render(request, "jobs/batch/launch.html", context)


def _frameworks() -> list[FrameworkVersion]:
    # An edited file without a new version: the list shows the versions already stored.
    with contextlib.suppress(ValueError):
        services.framework_sync()
    rows = FrameworkVersion.objects.select_related("framework").order_by("framework__name", "-pk")
    newest = {}
    for row in rows:
        newest.setdefault(row.framework.name, row)
    return list(newest.values())


@dashboard_view
def job_page(request: HttpRequest, job_id) -> HttpResponse:
    try:
        job = services.job_get(job_id)
    except CrucibleError:
        return render(request, "404.html", {"section": SECTION}, status=404)
    if request.method == "POST":
        if not _can_run(request):
            return _forbidden(request)
        action = request.POST.get("action")
        handler = {
            "pause": services.job_pause,
            "resume": services.job_resume,
            "cancel": services.job_cancel,
        }.get(action)
        if handler is None:
            messages.error(request, "Unknown action.")
        else:
            try:
                handler(job=job)
                messages.success(request, f"Job {action}d." if action != "cancel" else "Cancelled.")
            except CrucibleError as exc:
                messages.error(request, exc.message)
        return redirect("batch:job", job_id=job.pk)
    progress = results.progress(job)
    errors = job.tasks.exclude(error_code="").select_related("framework_version__framework")
    filters = {k: request.GET.get(k, "") for k in ("error", "model", "status")}
    if filters["error"]:
        errors = errors.filter(error_code=filters["error"])
    if filters["model"]:
        errors = errors.filter(model_key=filters["model"])
    if filters["status"]:
        errors = errors.filter(status=filters["status"])
    budget = services.budget_remaining()
    cost = Decimal(progress["cost"])
    estimate = job.estimate_cost or Decimal(0)
    context = {
        "section": SECTION,
        "job": job,
        "progress": progress,
        "models": sorted(progress["by_model"].items()),
        "errors": list(
            errors.defer("raw_output", "parsed_output").order_by("-updated_at")[:ERROR_ROWS]
        ),
        "error_codes": sorted(
            k for k in progress["failure_taxonomy"] if k != "repaired_after_invalid"
        ),
        "filters": filters,
        "cost": cost,
        "cost_percent": min(100, round(100 * cost / estimate)) if estimate else 0,
        "budget": budget,
        "can_run": _can_run(request),
        "refresh_s": REFRESH_S,
    }
    if request.htmx and request.GET.get("part") == "live":
        return render(request, "jobs/batch/job.html#live", context)
    return render(request, "jobs/batch/job.html", context)


@dashboard_view
def results_page(request: HttpRequest, job_id) -> HttpResponse:
    try:
        job = services.job_get(job_id)
    except CrucibleError:
        return render(request, "404.html", {"section": SECTION}, status=404)
    snapshot = results.stats_refresh(job_id=job.pk, force=not job.is_active)
    data = snapshot.data if snapshot else {}
    models = [m["key"] for m in job.frozen.get("models", [])]
    table: dict[tuple, dict] = {}
    for row in data.get("per_text", []):
        key = (row["unit"], row["framework"], row["field"], row["level"])
        table.setdefault(key, {})[row["model"]] = row
    rows = [
        {
            "unit": k[0],
            "framework": k[1],
            "field": k[2],
            "level": k[3],
            "cells": [cells.get(m) for m in models],
        }
        for k, cells in sorted(table.items())
    ]
    example = {}
    for t in job.tasks.filter(status="succeeded").values(
        "pk", "model_key", "chunk__document__external_id", "chunk__position"
    )[:2000]:
        example.setdefault(
            (f"{t['chunk__document__external_id']}#{t['chunk__position']}", t["model_key"]), t["pk"]
        )
    context = {
        "section": SECTION,
        "job": job,
        "models": models,
        "rows": rows,
        "agreement": data.get("agreement", []),
        "tasks_done": snapshot.tasks_done if snapshot else 0,
        "computed_at": snapshot.computed_at if snapshot else None,
        "icc_form": data.get("icc_form", ""),
        "charts": results.charts(job, data),
        "examples": {f"{u}|{m}": pk for (u, m), pk in example.items()},
    }
    return render(request, "jobs/batch/results.html", context)


@dashboard_view
def task_page(request: HttpRequest, job_id, task_id: str) -> HttpResponse:
    task = (
        BatchTask.objects.select_related("job", "framework_version__framework", "chunk__document")
        .filter(job_id=job_id, pk=task_id)
        .first()
    )
    if task is None:
        return render(request, "404.html", {"section": SECTION}, status=404)
    context = {
        "section": SECTION,
        "task": task,
        "job": task.job,
        "messages_sent": services.task_messages(task),
        "parsed": json.dumps(task.parsed_output, indent=2)
        if task.parsed_output is not None
        else "",
    }
    return render(request, "jobs/batch/task.html", context)


@dashboard_view
def export_zip(request: HttpRequest, job_id) -> HttpResponse:
    try:
        job = services.job_get(job_id)
    except CrucibleError:
        return render(request, "404.html", {"section": SECTION}, status=404)
    response = HttpResponse(results.replication_package(job), content_type="application/zip")
    response["Content-Disposition"] = f'attachment; filename="batch-{job.pk}.zip"'
    return response
