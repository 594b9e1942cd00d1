"""Validation pages: the runs list, the before/after dashboard, the blind rating page and the
public share page. Actions post here and get the page's partial back (htmx)."""

from __future__ import annotations

from django.core.paginator import Paginator
from django.db.models import Count, Prefetch, Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from config.auth import has_capability
from config.errors import CrucibleError, NotFound
from config.views import dashboard_view
from evaluation import services
from evaluation.api import serve_report
from evaluation.models import (
    Approval,
    RatingPair,
    Report,
    RunStatus,
    ShareLink,
    ValidationRun,
)
from training.models import Artifact, JobStatus, TrainingJob

REFRESH_S = 3
SUITE_LABELS = [
    ("knowledge_retention", "Retention"),
    ("emotional_intelligence", "EI"),
    ("brand_voice", "Brand voice"),
]
STATUS_FILTERS = [("", "All statuses"), *RunStatus.choices]


def _forbidden(request: HttpRequest, message: str = "") -> HttpResponse:
    return render(request, "403.html", {"message": message}, status=403)


def _can(request: HttpRequest) -> dict:
    user = request.user
    return {
        "can_run": has_capability(user, "run_jobs"),
        "can_score": has_capability(user, "score_validations"),
        "can_approve": has_capability(user, "approve_validations"),
    }


# --- Index ---------------------------------------------------------------------------------


@dashboard_view
def index(request: HttpRequest) -> HttpResponse:
    filters = {"status": request.GET.get("status", ""), "q": request.GET.get("q", "").strip()}
    runs = ValidationRun.objects.for_list().annotate(n_ratings=Count("ratings"))
    if filters["status"] in RunStatus.values:
        runs = runs.filter(status=filters["status"])
    if filters["q"]:
        runs = runs.filter(job__name__icontains=filters["q"])
    runs = runs.prefetch_related(
        Prefetch(
            "job__approvals",
            queryset=Approval.objects.order_by("-decided_at", "-id"),
            to_attr="approval_history",
        )
    )
    page = Paginator(runs.order_by("-created_at", "-id"), 25).get_page(request.GET.get("page"))
    for run in page:
        run.approval = (run.job.approval_history or [None])[0]
        run.cards = _headline(run.metrics or {})
    ready = (
        TrainingJob.objects.filter(
            status=JobStatus.COMPLETED, artifacts__kind=Artifact.Kind.ADAPTER
        )
        .exclude(validation_runs__isnull=False)
        .select_related("base_model")
        .order_by("-completed_at")[:10]
    )
    context = {
        "section": "evaluations",
        "page": page,
        "runs": list(page),
        "filters": filters,
        "filtered": any(filters.values()),
        "status_filters": STATUS_FILTERS,
        "any_active": any(r.is_active for r in page),
        "ready_jobs": list(ready),
        "refresh_s": REFRESH_S,
        "summary": ValidationRun.objects.aggregate(
            total=Count("id"),
            active=Count("id", filter=Q(status__in=(RunStatus.PENDING, RunStatus.RUNNING))),
            completed=Count("id", filter=Q(status=RunStatus.COMPLETED)),
            failed=Count("id", filter=Q(status=RunStatus.FAILED)),
        ),
        **_can(request),
    }
    if request.htmx and request.GET.get("part") == "runs":
        return render(request, "evaluation/index.html#run-table", context)
    return render(request, "evaluation/index.html", context)


def _headline(metrics: dict) -> dict:
    ppl = metrics.get("perplexity") or {}
    ret = metrics.get("retention") or {}
    return {
        "ppl": ppl.get("improvement_pct"),
        "ppl_passed": ppl.get("passed"),
        "retention": ret.get("retention_pct"),
        "retention_alert": ret.get("alert"),
    }


@require_POST
@dashboard_view
def job_validate(request: HttpRequest, job_id) -> HttpResponse:
    if not has_capability(request.user, "run_jobs"):
        return _forbidden(request, "Only engineers can start validations.")
    job = get_object_or_404(TrainingJob, pk=job_id)
    try:
        run = services.validation_run_create(job=job, user=request.user)
    except CrucibleError as exc:
        active = job.validation_runs.filter(status__in=(RunStatus.PENDING, RunStatus.RUNNING))
        if active.exists():
            return redirect("evaluation:run", active.first().pk)
        return render(request, "400.html", {"message": exc.message}, status=exc.status_code)
    return redirect("evaluation:run", run.pk)


# --- Dashboard -----------------------------------------------------------------------------


def _pct(value):
    return None if value is None else round(100 * value, 1)


def _metric_cards(metrics: dict) -> list[dict]:
    """One card per part with its display line, interval and pass mark."""
    cards = []
    ppl = metrics.get("perplexity")
    if ppl:
        cards.append(
            {
                "key": "perplexity",
                "title": "Perplexity",
                "before": ppl.get("baseline"),
                "after": ppl.get("trained"),
                "fmt": "1",
                "display": ppl.get("display"),
                "value": ppl.get("improvement_pct"),
                "unit": "% improvement",
                "ci": (ppl.get("ci_low"), ppl.get("ci_high")),
                "target": f"Target ≥ {ppl.get('target_pct', 30):.0f}% improvement",
                "passed": ppl.get("passed"),
                "sub": f"{ppl.get('n_documents', 0)} held-out conversations",
            }
        )
    ret = metrics.get("retention")
    if ret:
        cards.append(
            {
                "key": "retention",
                "title": "Knowledge retention",
                "before": _pct(ret.get("baseline_accuracy")),
                "after": _pct(ret.get("trained_accuracy")),
                "suffix": "%",
                "fmt": "0",
                "display": ret.get("display"),
                "value": ret.get("retention_pct"),
                "unit": "% of base accuracy",
                "ci": (ret.get("ci_low"), ret.get("ci_high")),
                "target": f"Alert below {ret.get('threshold_pct', 95):.0f}%",
                "passed": None if ret.get("alert") is None else not ret.get("alert"),
                "fail_label": "Forgetting alert",
                "sub": f"{ret.get('n_questions', 0)} finance questions",
            }
        )
    ei = metrics.get("emotional_intelligence")
    if ei:
        awaiting = ei.get("baseline_mean") is None
        cards.append(
            {
                "key": "emotional_intelligence",
                "title": "Emotional intelligence",
                "before": ei.get("baseline_mean"),
                "after": ei.get("trained_mean"),
                "suffix": "/5",
                "fmt": "1",
                "display": "Awaiting scores" if awaiting else ei.get("display"),
                "value": ei.get("improvement_pct"),
                "unit": "% improvement",
                "ci": (ei.get("ci_low"), ei.get("ci_high")),
                "target": f"Target ≥ {ei.get('target_pct', 40):.0f}% improvement",
                "passed": ei.get("passed"),
                "sub": _source_label(ei.get("source"), ei.get("n"), "scenarios"),
            }
        )
    bv = metrics.get("brand_voice")
    if bv:
        cards.append(
            {
                "key": "brand_voice",
                "title": "Brand voice",
                "before": (bv.get("baseline") or {}).get("consistency_pct"),
                "after": bv.get("consistency_pct"),
                "suffix": "%",
                "fmt": "0",
                "display": bv.get("display"),
                "value": bv.get("consistency_pct"),
                "unit": "% consistency",
                "ci": (bv.get("ci_low"), bv.get("ci_high")),
                "target": f"Target ≥ {bv.get('target_pct', 85):.0f}%",
                "passed": bv.get("passed"),
                "sub": _source_label(bv.get("source"), bv.get("n_responses"), "responses")
                + (f" · {len(bv.get('flagged') or [])} flagged" if bv.get("flagged") else ""),
            }
        )
    return cards


def _source_label(source: str | None, n: int | None, noun: str) -> str:
    label = {
        "human": "Human ratings",
        "judge": "LLM judge",
        "human+judge": "Human ratings + LLM judge",
    }.get(source or "", "No scores yet")
    return f"{label} · {n or 0} {noun}"


def _run_context(request: HttpRequest, run: ValidationRun) -> dict:
    metrics = run.metrics or {}
    reports = list(
        Report.objects.filter(run=run).prefetch_related(
            Prefetch("share_links", queryset=ShareLink.objects.order_by("-created_at"))
        )
    )
    approvals = list(Approval.objects.filter(job_id=run.job_id).select_related("decided_by", "run"))
    health = metrics.get("generation_health") or {}
    ei = metrics.get("emotional_intelligence") or {}
    bv = metrics.get("brand_voice") or {}
    context = {
        "section": "evaluations",
        "run": run,
        "job": run.job,
        "cards": _metric_cards(metrics),
        "metrics": metrics,
        "ei": ei,
        "bv": bv,
        "health": health,
        "examples": run.examples or [],
        "reports": reports,
        "latest_report": reports[0] if reports else None,
        "approvals": approvals,
        "approval": approvals[0] if approvals else None,
        "refresh_s": REFRESH_S,
        "ratings_total": run.ratings.count(),
        "suite_versions": [
            (label, (run.suites or {}).get(name))
            for name, label in SUITE_LABELS
            if (run.suites or {}).get(name)
        ],
        "ratings_since": _ratings_since(run, metrics),
        **_can(request),
    }
    if context["can_score"] and run.status == RunStatus.COMPLETED:
        context["my_progress"] = services.rating_progress(run=run, rater=request.user)
    return context


def _ratings_since(run: ValidationRun, metrics: dict) -> int:
    from django.utils.dateparse import parse_datetime

    computed = parse_datetime(metrics.get("computed_at") or "")
    ratings = run.ratings.all()
    return ratings.filter(created_at__gt=computed).count() if computed else ratings.count()


def _get_run(run_id) -> ValidationRun:
    return get_object_or_404(
        ValidationRun.objects.select_related("job", "job__base_model", "job__preset", "created_by"),
        pk=run_id,
    )


@dashboard_view
def run_detail(request: HttpRequest, run_id) -> HttpResponse:
    run = _get_run(run_id)
    context = _run_context(request, run)
    if request.htmx and request.GET.get("part") == "status":
        if not run.is_active:
            response = HttpResponse(status=204)
            response["HX-Refresh"] = "true"  # finished: show the full dashboard
            return response
        return render(request, "evaluation/run.html#run-status", context)
    return render(request, "evaluation/run.html", context)


def _action_response(request: HttpRequest, run: ValidationRun, part: str, error: str = ""):
    context = {**_run_context(request, run), "action_error": error}
    if request.htmx:
        return render(request, f"evaluation/run.html#{part}", context)
    return redirect("evaluation:run", run.pk)


@require_POST
@dashboard_view
def run_cancel(request: HttpRequest, run_id) -> HttpResponse:
    run = _get_run(run_id)
    if not has_capability(request.user, "run_jobs"):
        return _forbidden(request, "Only users who can run validations can cancel them.")
    try:
        services.validation_run_cancel(run=run, user=request.user)
    except CrucibleError as exc:
        if not request.htmx:
            context = {**_run_context(request, run), "cancel_error": exc.message}
            return render(request, "evaluation/run.html", context, status=409)
        # Finished meanwhile (the only reason a cancel is refused): show it as it is now.
    if request.htmx:
        response = HttpResponse(status=204)
        response["HX-Refresh"] = "true"
        return response
    return redirect("evaluation:run", run.pk)


@require_POST
@dashboard_view
def run_approve(request: HttpRequest, run_id) -> HttpResponse:
    run = _get_run(run_id)
    if not has_capability(request.user, "approve_validations"):
        return _forbidden(request, "Only analysts can approve or reject a model.")
    error = ""
    try:
        services.approval_decide(
            run=run,
            user=request.user,
            decision=request.POST.get("decision", ""),
            reason=request.POST.get("reason", ""),
        )
    except CrucibleError as exc:
        error = exc.message
    response = _action_response(request, run, "approval", error)
    if error:
        response.status_code = 422 if not request.htmx else 200
    return response


@require_POST
@dashboard_view
def run_report(request: HttpRequest, run_id) -> HttpResponse:
    run = _get_run(run_id)
    if not has_capability(request.user, "score_validations"):
        return _forbidden(request, "Only analysts can regenerate reports.")
    error = ""
    try:
        services.validation_report_generate(run=run, user=request.user)
        run.refresh_from_db()
    except CrucibleError as exc:
        error = exc.message
    if request.htmx and not error:
        response = HttpResponse(status=204)
        response["HX-Refresh"] = "true"  # every figure on the page may have changed
        return response
    return _action_response(request, run, "reports", error)


@require_POST
@dashboard_view
def report_share(request: HttpRequest, report_id: int) -> HttpResponse:
    report = get_object_or_404(Report.objects.select_related("run"), pk=report_id)
    if not has_capability(request.user, "score_validations"):
        return _forbidden(request, "Only analysts can share reports.")
    services.share_link_create(report=report, user=request.user)
    return _action_response(request, _get_run(report.run_id), "reports")


@require_POST
@dashboard_view
def share_revoke(request: HttpRequest, link_id: int) -> HttpResponse:
    link = get_object_or_404(ShareLink.objects.select_related("report"), pk=link_id)
    if not has_capability(request.user, "score_validations"):
        return _forbidden(request, "Only analysts can revoke share links.")
    services.share_link_revoke(link=link, user=request.user)
    return _action_response(request, _get_run(link.report.run_id), "reports")


@require_GET
@dashboard_view
def report_download(request: HttpRequest, report_id: int) -> HttpResponse:
    return serve_report(get_object_or_404(Report, pk=report_id))


# --- Blind rating --------------------------------------------------------------------------


@dashboard_view
def rate(request: HttpRequest, run_id) -> HttpResponse:
    """One item at a time: the client's message and Response A / Response B. Which one the base
    model wrote is decided and kept on the server; the page never says."""
    run = _get_run(run_id)
    if not has_capability(request.user, "score_validations"):
        return _forbidden(request, "Only analysts can rate responses.")
    suite = request.GET.get("suite") or request.POST.get("suite") or None
    errors: list[str] = []
    form = None
    if request.method == "POST":
        pair = RatingPair.objects.filter(
            pk=request.POST.get("item"), run=run, rater=request.user
        ).first()
        if pair is None:
            raise Http404("No such rating item.")
        keys = [k for k in request.POST if k.startswith(("a__", "b__"))]
        left = {k[3:]: request.POST[k] for k in keys if k.startswith("a__")}
        right = {k[3:]: request.POST[k] for k in keys if k.startswith("b__")}
        try:
            services.rating_submit(
                pair=pair,
                rater=request.user,
                left_scores=left,
                right_scores=right,
                comment=request.POST.get("comment", ""),
            )
        except CrucibleError as exc:
            errors.append(exc.message)
            form = {"a": left, "b": right, "comment": request.POST.get("comment", "")}
        if not errors and not request.htmx:
            url = reverse("evaluation:rate", args=[run.pk])
            return redirect(f"{url}?suite={suite}" if suite else url)
    try:
        pair = services.rating_pair_next(run=run, rater=request.user, suite=suite)
    except CrucibleError as exc:
        return render(request, "400.html", {"message": exc.message}, status=exc.status_code)
    item = services.rating_pair_view(pair=pair) if pair else None
    context = {
        "section": "evaluations",
        "run": run,
        "job": run.job,
        "item": item,
        "item_token": str(pair.pk) if pair else "",
        "suite": suite or "",
        "progress": services.rating_progress(run=run, rater=request.user),
        "errors": errors,
        "form": form or {"a": {}, "b": {}, "comment": ""},
        "scale": [1, 2, 3, 4, 5],
    }
    if request.htmx:
        return render(request, "evaluation/rate.html#rating-card", context)
    return render(request, "evaluation/rate.html", context)


# --- Public share --------------------------------------------------------------------------


def _shared_link(token: str) -> ShareLink:
    try:
        return services.share_link_resolve(token=token)
    except NotFound as exc:
        raise Http404(exc.message) from exc


@require_GET
def shared(request: HttpRequest, token: str) -> HttpResponse:
    """What a client sees from a share link: no sign-in, 404 once expired or revoked."""
    link = _shared_link(token)
    report = link.report
    run = report.run
    return render(
        request,
        "evaluation/shared.html",
        {
            "link": link,
            "report": report,
            "run": run,
            "job": run.job,
            "figures": report.metrics or {},
        },
    )


@require_GET
def shared_download(request: HttpRequest, token: str) -> HttpResponse:
    link = _shared_link(token)
    services.share_link_used(link=link)
    return serve_report(link.report)
