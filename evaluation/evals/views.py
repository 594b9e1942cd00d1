"""Evaluation pages: history (with dataset upload and single evaluation forms), a result,
batch evaluations (list with launcher, detail with live progress and aggregates, drill-down)
and the metrics dashboard. One view per page; htmx asks for a partial with ``?part=``.

The aggregates come from evaluation/evals/aggregates.py as fractions; the ``_*`` helpers here
only turn them into what a page shows (percentages, intervals, bar widths, labels)."""

from __future__ import annotations

import json
import re
from datetime import datetime

from django.contrib import messages
from django.db.models import Count, Q
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from config.errors import CrucibleError
from config.views import dashboard_view
from evaluation.evals import datasets, rubrics, services
from evaluation.evals.aggregates import wilson
from evaluation.evals.api import SampleFilter, batch_out, filtered_items
from evaluation.models import BatchEval, EvalDataset, EvalRun
from jobs import gateway

SECTION = "evaluations"
REFRESH_S = 3
WRITE_CAPABILITIES = ("core.run_jobs", "core.score_validations")
FAILURE_LABELS = dict(EvalRun.Failure.choices)
DASHBOARD_ROUTES = 12
RANGE = "\u2013"  # an en dash between the ends of an interval
ROUTE_PARAM = re.compile(r"<(?:\w+:)?(\w+)>")
METHOD_LABELS = {
    "reference": "compared with the reference",
    "claims_in_contexts": "share of claims the contexts support",
    "claims_unsupported": "share of claims nothing supports",
    "judge": "graded by an LLM judge",
}


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


# --- Display helpers ----------------------------------------------------------------------------


def _pct(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}%"


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _rate(p: dict | None) -> dict:
    """A Wilson pass rate as a page shows it: its percentage, the interval, k of n."""
    if not p or not p.get("n"):
        return {"text": "—", "ci": "", "k": 0, "n": 0}
    return {
        "text": _pct(p["rate"]),
        "ci": f"{_pct(p['ci_low'])[:-1]}{RANGE}{_pct(p['ci_high'])}",
        "k": p.get("k", 0),
        "n": p["n"],
    }


def _mean(d: dict | None) -> dict:
    if not d or d.get("mean") is None:
        return {"text": "—", "ci": "", "n": 0}
    ci = ""
    if d.get("ci_low") is not None and d.get("ci_high") is not None:
        ci = f"{_num(d['ci_low'])}{RANGE}{_num(d['ci_high'])}"
    return {"text": _num(d["mean"]), "ci": ci, "n": d.get("n", 0)}


def _signed(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "—" if value is None else f"{value * scale:+.{digits}f}"


def _difference(d: dict, *, scale: float, digits: int) -> dict:
    if d.get("difference") is None:
        return {"text": "—", "ci": "", "n": d.get("n"), "clear": False}
    low, high = d.get("ci_low"), d.get("ci_high")
    return {
        "text": _signed(d["difference"], scale, digits),
        "ci": f"{_signed(low, scale, digits)} to {_signed(high, scale, digits)}"
        if low is not None and high is not None
        else "",
        "n": d.get("n"),
        # The interval excludes zero: a difference the data supports.
        "clear": low is not None and high is not None and (low > 0 or high < 0),
    }


def _dimensions(rubric_name: str, fallback: list[str]) -> list[dict]:
    """The rubric's dimensions (key, title, threshold, direction), in its order."""
    try:
        dims = rubrics.rubric_get(rubric_name).dimensions
    except ValueError:
        return [{"key": k, "title": k.capitalize()} for k in fallback]
    return [
        {
            "key": d["key"],
            "title": d.get("title", d["key"]),
            "pass_threshold": d.get("pass_threshold"),
            "higher_is_better": d.get("higher_is_better", True),
            "method": d["method"],
        }
        for d in dims
    ]


def _score_cell(entry: dict | None) -> dict:
    """One dimension of one run, for a table cell."""
    if not isinstance(entry, dict):
        return {"text": "—", "state": "none", "title": "not scored"}
    if entry.get("value") is not None:
        passed = entry.get("passed")
        return {
            "text": _num(entry["value"]),
            "state": "pass" if passed else "fail" if passed is False else "none",
            "title": f"pass {'≥' if entry.get('higher_is_better', True) else '≤'} "
            f"{entry.get('pass_threshold')}",
        }
    if entry.get("error"):
        return {"text": "no grade", "state": "fail", "title": entry["error"][:200]}
    if entry.get("not_applicable"):
        return {"text": "n/a", "state": "none", "title": entry["not_applicable"]}
    return {"text": "—", "state": "none", "title": "not scored"}


def _route_label(method: str, route: str) -> str:
    """'GET /v1/x/<uuidstr:batch_id>/samples' -> 'GET /v1/x/{batch_id}/samples'."""
    path = ROUTE_PARAM.sub(r"{\1}", route)
    return f"{method} {path}"


# --- Single evaluations -------------------------------------------------------------------------


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
    # One column per dimension of the rubrics listed (in rubric order, each key once).
    columns: dict[str, str] = {}
    for name in dict.fromkeys(r.rubric for r in runs):
        for d in _dimensions(name, []):
            columns.setdefault(d["key"], d["key"].capitalize())
    rows = [(run, [_score_cell(run.scores.get(key)) for key in columns]) for run in runs]
    context.update({"rows": rows, "columns": columns, "upload_errors": upload_errors})
    return render(request, "evaluation/evals/history.html", context)


@dashboard_view
def run_detail(request: HttpRequest, run_id) -> HttpResponse:
    run = EvalRun.objects.select_related("dataset", "batch").filter(pk=run_id).first()
    if run is None:
        return render(request, "404.html", {"section": SECTION}, status=404)
    # Every dimension of the rubric gets a card, scored or not (a run that failed before a
    # dimension was scored says so instead of leaving it out).
    cards = []
    for dim in _dimensions(run.rubric, list(run.scores)):
        entry = run.scores.get(dim["key"]) or {}
        value = entry.get("value")
        threshold = entry.get("pass_threshold", dim.get("pass_threshold"))
        cards.append(
            {
                **dim,
                "title": entry.get("title") or dim["title"],
                "entry": entry,
                "value": _num(value) if value is not None else None,
                "percent": round(100 * max(0.0, min(1.0, value)), 1) if value is not None else 0,
                "threshold_percent": round(100 * threshold, 1) if threshold is not None else None,
                "threshold": threshold,
                "higher_is_better": entry.get("higher_is_better", dim.get("higher_is_better")),
                "passed": entry.get("passed"),
                "measures": [(k, _num(v, 3)) for k, v in (entry.get("measures") or {}).items()],
                "claims": entry.get("claims") or [],
                "method_label": METHOD_LABELS.get(dim.get("method", ""), dim.get("method", "")),
            }
        )
    params = run.metadata.get("parameters", {})
    judge = run.judge or {}
    return render(
        request,
        "evaluation/evals/run.html",
        {
            "section": SECTION,
            "run": run,
            "cards": cards,
            "failed_dimensions": [c["title"] for c in cards if c["passed"] is False],
            "params": params,
            "decoding": " · ".join(f"{k}={v}" for k, v in (params.get("decoding") or {}).items()),
            "environment": run.metadata.get("environment", {}),
            "judge": judge,
            "metadata_json": json.dumps(run.metadata, indent=2),
        },
    )


# --- Batch evaluations --------------------------------------------------------------------------


def _list_progress(rows: list[BatchEval]) -> dict:
    """Per batch: items finished, scored, failed, cancelled and the pass rate so far, from one
    grouped query (the list does not compute each batch's full aggregates)."""
    done = ~Q(status__in=EvalRun.OPEN)
    decided = Q(status__in=(EvalRun.Status.SUCCEEDED, EvalRun.Status.FAILED), passed__isnull=False)
    counts = (
        EvalRun.objects.filter(batch__in=rows)
        .values("batch_id")
        .annotate(
            total=Count("pk"),
            done=Count("pk", filter=done),
            succeeded=Count("pk", filter=Q(status=EvalRun.Status.SUCCEEDED)),
            failed=Count("pk", filter=Q(status=EvalRun.Status.FAILED)),
            cancelled=Count("pk", filter=Q(status=EvalRun.Status.CANCELLED)),
            decided=Count("pk", filter=decided),
            passed=Count("pk", filter=decided & Q(passed=True)),
        )
    )
    out = {}
    for c in counts:
        flags = [True] * c["passed"] + [False] * (c["decided"] - c["passed"])
        total = c["total"] or 1
        out[c["batch_id"]] = {
            **c,
            "finished": c["succeeded"] + c["failed"],
            "percent": round(100 * c["done"] / total, 1),
            "bar": _segments(c["succeeded"], c["failed"], c["cancelled"], c["total"]),
            "pass_rate": _rate(wilson(flags)),
        }
    return out


def _segments(succeeded: int, failed: int, cancelled: int, total: int) -> list[dict]:
    total = total or 1
    return [
        {"kind": kind, "label": label, "count": n, "width": round(100 * n / total, 2)}
        for kind, label, n in (
            ("scored", "scored", succeeded),
            ("failed", "failed", failed),
            ("cancelled", "cancelled", cancelled),
        )
        if n
    ]


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
    progress = _list_progress(rows)
    context.update(
        {
            "batches": [(b, progress.get(b.pk)) for b in rows],
            "any_active": any(b.is_active for b in rows),
            "refresh_s": REFRESH_S,
        }
    )
    if request.htmx and request.GET.get("part") == "table":
        return render(request, "evaluation/evals/batches.html#batch-table", context)
    return render(request, "evaluation/evals/batches.html", context)


def _batch_view(batch: BatchEval, data: dict) -> dict:
    """The aggregates of ``batch_out`` as the detail page shows them."""
    agg = data["aggregates"]
    overall = agg["overall"]
    dims = _dimensions(batch.rubric, list(overall["dimensions"]))
    total_failures = sum(overall["failures"].values())
    taxonomy = [
        {
            "code": code,
            "label": FAILURE_LABELS.get(code, code),
            "count": n,
            "share": round(100 * n / overall["done"], 1) if overall["done"] else 0,
            "width": round(100 * n / max(overall["failures"].values()), 1) if n else 0,
        }
        for code, n in overall["failures"].items()
    ]
    models = []
    for key, m in agg["models"].items():
        models.append(
            {
                "key": key,
                "pass_rate": _rate(m["pass_rate"]),
                "dimensions": [_mean(m["dimensions"].get(d["key"])) for d in dims],
                "failures": [
                    {"code": c, "label": FAILURE_LABELS.get(c, c), "count": n}
                    for c, n in m["failures"].items()
                    if n
                ],
                "failure_total": sum(m["failures"].values()),
                "done": m["done"],
                "items": m["items"],
                "latency": m["latency_ms"],
                "tokens": m["tokens"],
                "cost": m["cost"],
            }
        )
    histograms = []
    for d in dims:
        summary = overall["dimensions"].get(d["key"]) or {}
        bins = summary.get("histogram") or []
        top = max((b["count"] for b in bins), default=0)
        histograms.append(
            {
                **d,
                "mean": _mean(summary),
                "n": summary.get("n", 0),
                "bins": [
                    {**b, "height": round(100 * b["count"] / top, 1) if top else 0} for b in bins
                ],
            }
        )
    comparisons = [
        {
            "baseline": c["baseline"],
            "model": c["model"],
            "pass_rate": _difference(c["pass_rate"], scale=100, digits=1),
            "dimensions": [
                {**d, **_difference(c["dimensions"][d["key"]], scale=1, digits=3)}
                for d in dims
                if d["key"] in c["dimensions"]
            ],
        }
        for c in agg["comparisons"]
    ]
    progress = data["progress"]
    open_items = progress["total"] - progress["done"]
    return {
        "dims": dims,
        "overall_rate": _rate(overall["pass_rate"]),
        "overall": overall,
        "taxonomy": taxonomy,
        "failure_total": total_failures,
        "models": models,
        "histograms": histograms,
        "comparisons": comparisons,
        "bar": _segments(
            overall["succeeded"], overall["failed"], overall["cancelled"], progress["total"]
        ),
        "open_items": open_items,
    }


@dashboard_view
def batch_detail(request: HttpRequest, batch_id) -> HttpResponse:
    batch = BatchEval.objects.select_related("dataset", "created_by").filter(pk=batch_id).first()
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
        "view": _batch_view(batch, data),
        "decoding": " · ".join(f"{k}={v}" for k, v in (batch.frozen.get("decoding") or {}).items()),
        "refresh_s": REFRESH_S,
        "can_write": _can_write(request),
    }
    if request.htmx and request.GET.get("part") == "live":
        return render(request, "evaluation/evals/batch.html#live", context)
    return render(request, "evaluation/evals/batch.html", context)


def _filter_chips(get, dims: dict[str, str]) -> list[str]:
    """The drill-down's filters in words."""
    chips = []
    if get.get("model"):
        chips.append(f"Model: {get['model']}")
    if get.get("failure"):
        failure = get["failure"]
        label = FAILURE_LABELS.get(failure, failure)
        chips.append("Any failure" if failure == "any" else f"Failure: {label}")
    if get.get("passed") in ("true", "false"):
        chips.append("Passed" if get["passed"] == "true" else "Not passed")
    if get.get("status"):
        chips.append(f"Status: {get['status']}")
    if get.get("dimension"):
        low, high = get.get("bin_low") or "0", get.get("bin_high") or "1"
        bracket = "]" if high in ("1", "1.0") else ")"
        title = dims.get(get["dimension"], get["dimension"])
        chips.append(f"{title} in [{low}, {high}{bracket}")
    return chips


@dashboard_view
def batch_samples(request: HttpRequest, batch_id) -> HttpResponse:
    batch = BatchEval.objects.select_related("dataset").filter(pk=batch_id).first()
    if batch is None:
        return render(request, "404.html", {"section": SECTION}, status=404)
    get = request.GET
    dims = _dimensions(batch.rubric, [])
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
    shown = rows[:1000]
    return render(
        request,
        "evaluation/evals/samples.html",
        {
            "section": SECTION,
            "batch": batch,
            "dims": dims,
            "rows": [
                (r, [(d["title"], _score_cell(r.scores.get(d["key"]))) for d in dims])
                for r in shown
            ],
            "total": len(rows),
            "chips": _filter_chips(get, {d["key"]: d["title"] for d in dims}),
            "filtered": any(v for v in get.values()),
            "error": error,
        },
    )


# --- Metrics dashboard --------------------------------------------------------------------------


@dashboard_view
def dashboard(request: HttpRequest) -> HttpResponse:
    from evaluation.evals.kpis import kpis

    data = kpis(window_minutes=int(request.GET.get("window", 60) or 60))
    routes = data["http"]["routes"][:DASHBOARD_ROUTES]
    chart = {
        "routes": [_route_label(r["method"], r["route"]) for r in routes],
        "p50": [r["latency_ms"]["p50"] for r in routes],
        "p95": [r["latency_ms"]["p95"] for r in routes],
        "errors": [r["errors"] for r in routes],
        "requests": [r["requests"] for r in routes],
    }
    evaluation = data["evaluation"]
    outcomes = [
        {
            **b,
            "rate": _rate(b.get("pass_rate")),
            "failure_total": sum((b.get("failures") or {}).values()),
            "finished": datetime.fromisoformat(b["finished_at"]) if b.get("finished_at") else None,
        }
        for b in evaluation["batches"]
    ]
    models = [
        {
            "key": key,
            **m,
            "error_pct": _pct(m["error_rate"]),
            "cache_pct": _pct(m["cache_hit_rate"], 0),
        }
        for key, m in sorted(data["gateway"]["models"].items(), key=lambda kv: -kv[1]["calls"])
    ]
    context = {
        "section": SECTION,
        "k": data,
        "chart": chart,
        "outcomes": outcomes,
        "gateway_models": models,
        "breakers": [
            {"slug": slug, **b, "label": str(b.get("state", "")).replace("_", "-")}
            for slug, b in data["breakers"].items()
        ],
        "single_rate": _rate(evaluation["single_pass_rate"]),
        "queued_total": None
        if any(q["depth"] is None for q in data["queues"].values())
        else sum(q["depth"] for q in data["queues"].values()),
        "cache_pct": _pct(data["gateway"]["cache_hit_rate"], 0)
        if data["gateway"]["cache_hit_rate"] is not None
        else "—",
        "refresh_s": 10,
    }
    if request.htmx and request.GET.get("part") == "kpis":
        return render(request, "evaluation/evals/dashboard.html#kpis", context)
    return render(request, "evaluation/evals/dashboard.html", context)
