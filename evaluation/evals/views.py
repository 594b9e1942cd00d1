"""Evaluation pages: history (with dataset upload and single evaluation forms), a result,
batch evaluations (list with launcher, detail with live progress and aggregates, drill-down)
and the metrics dashboard. One view per page; htmx asks for a partial with ``?part=``."""

from __future__ import annotations

import json

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from config.errors import CrucibleError
from config.views import dashboard_view
from evaluation.evals import datasets, rubrics, services
from evaluation.evals.api import SampleFilter, batch_out, filtered_items
from evaluation.models import BatchEval, EvalDataset, EvalRun
from jobs import gateway

SECTION = "evaluations"
REFRESH_S = 3
WRITE_CAPABILITIES = ("core.run_jobs", "core.score_validations")


def _can_write(request: HttpRequest) -> bool:
    return any(request.user.has_perm(p) for p in WRITE_CAPABILITIES)


def _forbidden(request: HttpRequest) -> HttpResponse:
    return render(request, "403.html", {"section": SECTION}, status=403)


def _error_text(exc: CrucibleError) -> str:
    return getattr(exc, "message", str(exc))


def _common(request: HttpRequest) -> dict:
    return {
        "section": SECTION,
        "can_write": _can_write(request),
        "datasets": list(EvalDataset.objects.all()[:200]),
        "rubrics": list(rubrics.all_rubrics().values()),
        "chat_models": list(gateway.models(capability="chat").values_list("key", flat=True)),
    }


@dashboard_view
def history(request: HttpRequest) -> HttpResponse:
    """Single evaluations, newest first (empty state), with the upload and evaluate forms."""
    context = _common(request)
    upload_errors = None
    if request.method == "POST":
        if not context["can_write"]:
            return _forbidden(request)
        action = request.POST.get("action")
        try:
            if action == "upload":
                upload = request.FILES.get("file")
                if upload is None:
                    raise services.InvalidInput("Choose a JSONL file to upload.")
                dataset = datasets.dataset_create(
                    user=request.user,
                    name=request.POST.get("name", "").strip() or "dataset",
                    stream=upload.file,
                    description=request.POST.get("description", ""),
                )
                messages.success(
                    request, f"Dataset {dataset.label}: {dataset.sample_count} samples stored."
                )
                return redirect("evals:history")
            if action == "evaluate":
                run = services.evaluation_create(
                    user=request.user,
                    rubric=request.POST.get("rubric", ""),
                    model=request.POST.get("model") or None,
                    dataset_id=int(request.POST["dataset"])
                    if request.POST.get("dataset")
                    else None,
                    sample_index=int(request.POST.get("sample_index") or 0),
                    input=request.POST.get("input") or None,
                    reference=request.POST.get("reference", ""),
                    contexts=[
                        c for c in request.POST.get("contexts", "").splitlines() if c.strip()
                    ],
                    output=request.POST.get("output") or None,
                )
                return redirect("evals:run", run_id=run.pk)
        except (CrucibleError, ValueError) as exc:
            if isinstance(exc, gateway.RateLimited):
                message = f"Rate limited: try again in {int(exc.retry_after or 1)} s."
            elif isinstance(exc, gateway.DeadlineExceeded):
                message = "The model did not answer in time; try again or choose another model."
            else:
                message = _error_text(exc) if isinstance(exc, CrucibleError) else str(exc)
            details = getattr(exc, "details", None) or {}
            upload_errors = details.get("errors") if isinstance(details, dict) else None
            messages.error(request, message)
    runs = list(EvalRun.objects.filter(batch__isnull=True).select_related("dataset")[:100])
    context.update({"runs": runs, "upload_errors": upload_errors})
    return render(request, "evaluation/evals/history.html", context)


@dashboard_view
def run_detail(request: HttpRequest, run_id) -> HttpResponse:
    run = EvalRun.objects.select_related("dataset", "batch").filter(pk=run_id).first()
    if run is None:
        return render(request, "404.html", {"section": SECTION}, status=404)
    return render(
        request,
        "evaluation/evals/run.html",
        {
            "section": SECTION,
            "run": run,
            "metadata_json": json.dumps(run.metadata, indent=2),
            "judge_json": json.dumps(run.judge, indent=2) if run.judge else "",
        },
    )


@dashboard_view
def batches(request: HttpRequest) -> HttpResponse:
    context = _common(request)
    if request.method == "POST":
        if not context["can_write"]:
            return _forbidden(request)
        try:
            batch = services.batch_eval_create(
                user=request.user,
                dataset_id=int(request.POST.get("dataset") or 0),
                models=request.POST.getlist("models"),
                rubric=request.POST.get("rubric", ""),
                runs=int(request.POST.get("runs") or 1),
                name=request.POST.get("name", ""),
            )
            return redirect("evals:batch", batch_id=batch.pk)
        except services.QueueFull as exc:
            messages.error(
                request, f"{exc.message} The queue is full: try again in {exc.retry_after} s."
            )
        except (CrucibleError, ValueError) as exc:
            messages.error(
                request, _error_text(exc) if isinstance(exc, CrucibleError) else str(exc)
            )
    rows = list(BatchEval.objects.select_related("dataset", "created_by")[:100])
    context.update(
        {"batches": rows, "any_active": any(b.is_active for b in rows), "refresh_s": REFRESH_S}
    )
    if request.htmx and request.GET.get("part") == "table":
        return render(request, "evaluation/evals/batches.html#batch-table", context)
    return render(request, "evaluation/evals/batches.html", context)


@dashboard_view
def batch_detail(request: HttpRequest, batch_id) -> HttpResponse:
    batch = BatchEval.objects.select_related("dataset").filter(pk=batch_id).first()
    if batch is None:
        return render(request, "404.html", {"section": SECTION}, status=404)
    if request.method == "POST":
        if not _can_write(request):
            return _forbidden(request)
        try:
            services.batch_eval_cancel(batch=batch)
            messages.success(request, "Batch evaluation cancelled.")
        except CrucibleError as exc:
            messages.error(request, _error_text(exc))
        return redirect("evals:batch", batch_id=batch.pk)
    data = batch_out(batch)
    context = {
        "section": SECTION,
        "batch": batch,
        "data": data,
        "aggregates": data["aggregates"],
        "failure_labels": dict(EvalRun.Failure.choices),
        "refresh_s": REFRESH_S,
        "can_write": _can_write(request),
    }
    if request.htmx and request.GET.get("part") == "live":
        return render(request, "evaluation/evals/batch.html#live", context)
    return render(request, "evaluation/evals/batch.html", context)


@dashboard_view
def batch_samples(request: HttpRequest, batch_id) -> HttpResponse:
    batch = BatchEval.objects.select_related("dataset").filter(pk=batch_id).first()
    if batch is None:
        return render(request, "404.html", {"section": SECTION}, status=404)
    get = request.GET
    try:
        f = SampleFilter(
            model=get.get("model") or None,
            failure=get.get("failure") or None,
            passed={"true": True, "false": False}.get(get.get("passed", "")),
            status=get.get("status") or None,
            dimension=get.get("dimension") or None,
            bin_low=float(get["bin_low"]) if get.get("bin_low") else None,
            bin_high=float(get["bin_high"]) if get.get("bin_high") else None,
            limit=1000,
        )
        rows = filtered_items(batch, f)
        error = None
    except (CrucibleError, ValueError) as exc:
        rows, error = [], _error_text(exc) if isinstance(exc, CrucibleError) else str(exc)
    return render(
        request,
        "evaluation/evals/samples.html",
        {
            "section": SECTION,
            "batch": batch,
            "rows": rows,
            "filters": {k: v for k, v in get.items() if v},
            "error": error,
            "failure_labels": dict(EvalRun.Failure.choices),
        },
    )


@dashboard_view
def dashboard(request: HttpRequest) -> HttpResponse:
    from evaluation.evals.kpis import kpis

    data = kpis(window_minutes=int(request.GET.get("window", 60) or 60))
    chart = {
        "routes": [f"{r['method']} {r['route']}" for r in data["http"]["routes"][:12]],
        "p50": [r["latency_ms"]["p50"] for r in data["http"]["routes"][:12]],
        "p95": [r["latency_ms"]["p95"] for r in data["http"]["routes"][:12]],
        "errors": [r["errors"] for r in data["http"]["routes"][:12]],
        "requests": [r["requests"] for r in data["http"]["routes"][:12]],
    }
    context = {"section": SECTION, "k": data, "chart": chart, "refresh_s": 10}
    if request.htmx and request.GET.get("part") == "kpis":
        return render(request, "evaluation/evals/dashboard.html#kpis", context)
    return render(request, "evaluation/evals/dashboard.html", context)
