"""``{% load evaluation_tags %}{% validation_card job %}``: the job page's Validation card."""

from django import template

from config.auth import has_capability

register = template.Library()


@register.inclusion_tag("evaluation/_job_card.html", takes_context=True)
def validation_card(context, job) -> dict:
    from evaluation.models import Approval, Report, ValidationRun

    request = context.get("request")
    user = getattr(request, "user", None)
    run = ValidationRun.objects.filter(job=job).order_by("-created_at").first()
    report = (
        Report.objects.filter(run__job=job).order_by("-run__created_at", "-version").first()
        if run
        else None
    )
    metrics = (run.metrics or {}) if run else {}
    return {
        "job": job,
        "run": run,
        "report": report,
        "approval": Approval.objects.filter(job=job).select_related("decided_by").first(),
        "lines": [
            (metrics.get(part) or {}).get("display")
            for part in ("perplexity", "retention", "emotional_intelligence", "brand_voice")
            if (metrics.get(part) or {}).get("display")
        ],
        "can_run": has_capability(user, "run_jobs"),
        "csrf_token": context.get("csrf_token"),
    }
