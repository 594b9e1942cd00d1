"""Email (Django's mail backends) and Slack (an incoming webhook) notifications, all logged.

Slack: settings.SLACK_WEBHOOK_URL receives ``{"text": ...}`` as JSON, posted with the
standard library through config.retry.call_with_retry: timeouts, connection errors, 429 and
5xx are transient (retried), other 4xx permanent. A failed delivery is logged, never raised.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

from django.conf import settings
from django.core.mail import send_mail
from django.urls import reverse

from billing import conf
from billing.models import NotificationLog, NotificationPreference
from config.addresses import absolute_url
from config.errors import ExternalServiceError
from config.retry import call_with_retry

logger = logging.getLogger("crucible.billing.notifications")

SLACK_TIMEOUT_S = 5.0
SLACK_ATTEMPTS = 3
SLACK_RETRY_INITIAL_S = 0.5
SLACK_DEADLINE_S = 20.0


def _post_json(url: str, payload: dict, timeout: float) -> None:
    if not url.startswith(("https://", "http://")):
        raise ExternalServiceError(
            "SLACK_WEBHOOK_URL must be an http(s) address.", service="slack", transient=False
        )
    request = urllib.request.Request(  # noqa: S310 (scheme checked above)
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            response.read()
    except urllib.error.HTTPError as exc:
        retry_after = exc.headers.get("Retry-After") if exc.headers else None
        raise ExternalServiceError(
            f"Slack answered HTTP {exc.code}.",
            service="slack",
            transient=exc.code >= 500 or exc.code == 429,
            retry_after=float(retry_after) if retry_after and retry_after.isdigit() else None,
        ) from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ExternalServiceError(
            f"Slack could not be reached: {reason}.", service="slack", transient=True
        ) from exc


def send_slack(*, kind: str, text: str) -> dict:
    url = conf.slack_webhook_url()
    if not url:
        return {"ok": False, "skipped": "SLACK_WEBHOOK_URL is not set"}
    try:
        call_with_retry(
            lambda: _post_json(url, {"text": text}, SLACK_TIMEOUT_S),
            attempts=SLACK_ATTEMPTS,
            initial=SLACK_RETRY_INITIAL_S,
            maximum=5.0,
            deadline=SLACK_DEADLINE_S,
        )
    except ExternalServiceError as exc:
        logger.error("Slack %s notification failed: %s", kind, exc.message)
        NotificationLog.objects.create(
            kind=kind, channel="slack", subject=text[:300], ok=False, error=exc.message
        )
        return {"ok": False, "error": exc.message}
    NotificationLog.objects.create(kind=kind, channel="slack", subject=text[:300], ok=True)
    return {"ok": True}


def send_email(*, kind: str, subject: str, body: str, recipients: list[str]) -> dict:
    if not recipients:
        NotificationLog.objects.create(
            kind=kind, channel="email", subject=subject[:300], ok=False, error="no recipients"
        )
        return {"ok": False, "skipped": "no recipients"}
    try:
        send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, recipients, fail_silently=False)
    except Exception as exc:  # any backend's error: logged, never raised
        logger.exception("email %s to %s failed", kind, recipients)
        NotificationLog.objects.create(
            kind=kind,
            channel="email",
            recipients=", ".join(recipients),
            subject=subject[:300],
            ok=False,
            error=f"{type(exc).__name__}: {exc}"[:2000],
        )
        return {"ok": False, "error": str(exc)}
    NotificationLog.objects.create(
        kind=kind, channel="email", recipients=", ".join(recipients), subject=subject[:300], ok=True
    )
    return {"ok": True, "recipients": recipients}


def _budgets_url() -> str:
    return absolute_url(reverse("billing:index"))


def _job_url(job) -> str:
    """The job's page on this platform's address (config/addresses.py), built with reverse."""
    return absolute_url(reverse("training:detail", args=[job.pk]))


def budget_alert_notify(*, alert, summary: dict, channels: list[str] | None = None) -> dict:
    """The alert on ``channels`` (default: all of the alert's)."""
    from billing.services import admin_recipients

    channels = alert.channels if channels is None else channels

    jobs = summary["active_jobs"]
    subject = (
        f"[Crucible] {alert.threshold}% of the {summary['month']} budget used: "
        f"${summary['spent']} of ${summary['budget']}"
    )
    lines = [
        f"Spending this month has reached {alert.threshold}% of the budget.",
        "",
        f"Spent:      ${summary['spent']}",
        f"Budget:     ${summary['budget']}",
        f"Remaining:  ${summary['remaining']}",
        f"Forecast:   ${summary['forecast']} (spent + what active jobs are expected to add)",
        f"Active jobs ({len(jobs)}):",
        *[f"  - {j['name']} ({j['status']})" for j in jobs],
        "",
        f"See the spending or raise the budget: {_budgets_url()}",
    ]
    body = "\n".join(lines)
    delivery = {}
    if "email" in channels:
        delivery["email"] = send_email(
            kind="budget_alert", subject=subject, body=body, recipients=admin_recipients()
        )
    if "slack" in channels:
        delivery["slack"] = send_slack(kind="budget_alert", text=f"*{subject}*\n" + body)
    return delivery


def cost_variance_notify(*, job, cost) -> dict:
    from billing.services import admin_recipients

    subject = (
        f"[Crucible] {job.name}: cost ${cost.accrued:.2f} is {cost.variance_pct:.0f}% over "
        f"its ${cost.estimate_cost} estimate"
    )
    body = (
        f"Job {job.name} ({job.pk}) has cost ${cost.accrued:.2f} so far, against an estimate "
        f"of ${cost.estimate_cost} ({cost.variance_pct:+.1f}%). Cancel it from the job page if "
        f"it is running longer than expected: {_job_url(job)}"
    )
    recipients = sorted(
        set(admin_recipients())
        | ({job.created_by.email} if job.created_by and job.created_by.email else set())
    )
    return {
        "email": send_email(
            kind="cost_variance", subject=subject, body=body, recipients=recipients
        ),
        "slack": send_slack(kind="cost_variance", text=f"{subject}\n{_job_url(job)}"),
    }


def job_finished_notify(*, job) -> dict:
    """Completion and failure notices to the job's creator, as their preferences say."""
    user = job.created_by
    if user is None or job.status not in ("completed", "failed", "cancelled"):
        return {}
    pref = NotificationPreference.objects.filter(user=user).first() or NotificationPreference(
        user=user
    )
    capped = bool(getattr(job, "billing", None) and job.billing.capped_at)
    if job.status == "completed":
        wants_email, kind = pref.job_completed_email, "job_completed"
        subject = f"[Crucible] Training job {job.name} completed"
    elif job.status == "failed" or capped:
        wants_email, kind = pref.job_failed_email, "job_failed"
        why = "was stopped at the budget hard cap" if capped else "failed"
        subject = f"[Crucible] Training job {job.name} {why}"
    else:
        return {}
    body = (
        f"{subject[11:]}.\n\nStatus: {job.status}\nCost: ${job.cost_actual:.2f}"
        f"{f' (estimate ${job.cost_estimate})' if job.cost_estimate is not None else ''}\n"
        f"{f'Error: {job.error_message}' if job.error_message else ''}\n"
        f"{_job_url(job)}"
    )
    result = {}
    if wants_email and user.email:
        result["email"] = send_email(kind=kind, subject=subject, body=body, recipients=[user.email])
    if pref.job_slack:
        result["slack"] = send_slack(kind=kind, text=f"{subject}\n{_job_url(job)}")
    return result
