"""Dashboard shell pages, health endpoints and error pages."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.db.models import F
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from config import health
from config.errors import envelope
from config.tasks import last_worker_heartbeat

WORKER_STALE_AFTER_S = 180


def dashboard_view(view):
    """Signed-in users with a role that may read the dashboard."""

    def check(request: HttpRequest, *args, **kwargs):
        if not request.user.has_perm("core.view_dashboard"):
            return render(request, "403.html", {"no_role": True}, status=403)
        return view(request, *args, **kwargs)

    check.__name__ = view.__name__
    check.__doc__ = view.__doc__
    return login_required(check)


def _worker_status() -> dict:
    seen = last_worker_heartbeat()
    if seen is None:
        return {"status": "unknown", "seen": None}
    age = (timezone.now() - seen).total_seconds()
    return {"status": "ok" if age < WORKER_STALE_AFTER_S else "stale", "seen": seen}


@dashboard_view
def overview(request: HttpRequest) -> HttpResponse:
    context = {"section": "overview", "readiness": health.readiness(), "worker": _worker_status()}
    if request.htmx and request.GET.get("part") == "status":
        return render(request, "overview.html#status", context)
    from training.models import TERMINAL_STATUSES, TrainingJob

    jobs = TrainingJob.objects.for_list()
    finished = jobs.filter(status__in=TERMINAL_STATUSES).order_by(
        F("completed_at").desc(nulls_last=True), "-created_at"
    )
    context |= {
        "active_jobs": list(TrainingJob.objects.active().for_list()[:10]),
        "recent_jobs": list(finished[:10]),
    }
    return render(request, "overview.html", context)


@require_GET
@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@require_GET
@never_cache
def readyz(request: HttpRequest) -> JsonResponse:
    result = health.readiness()
    status = 200 if result["status"] == "ok" else 503
    if not _is_admin_caller(request):
        result = health.public_view(result)
    return JsonResponse(result, status=status)


def _is_admin_caller(request: HttpRequest) -> bool:
    """A signed-in admin: the dashboard session, or an admin's API token (for scripts)."""
    from config.auth import ApiTokenAuth
    from config.roles import Role, role_of

    user = request.user if request.user.is_authenticated else None
    if user is None and request.headers.get("Authorization"):
        user = ApiTokenAuth().authenticate(request, request.headers["Authorization"])
    return user is not None and role_of(user) is Role.ADMIN


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith("/api/")


def _json_error(request: HttpRequest, status: int, code: str, message: str) -> JsonResponse:
    body = envelope(code=code, message=message, request_id=getattr(request, "request_id", None))
    return JsonResponse(body, status=status)


def page_not_found(request: HttpRequest, exception=None) -> HttpResponse:
    if _is_api(request):
        return _json_error(request, 404, "not_found", f"No API route at {request.path}.")
    return render(request, "404.html", status=404)


def permission_denied(request: HttpRequest, exception=None) -> HttpResponse:
    if _is_api(request):
        return _json_error(request, 403, "permission_denied", "Your role does not allow this.")
    return render(request, "403.html", status=403)


def bad_request(request: HttpRequest, exception=None) -> HttpResponse:
    if _is_api(request):
        return _json_error(request, 400, "bad_request", "The request could not be understood.")
    return render(request, "400.html", status=400)


def server_error(request: HttpRequest) -> HttpResponse:
    if _is_api(request):
        return _json_error(
            request, 500, "server_error", "Something went wrong on our side. Quote the request ID."
        )
    # No template context processors here: the failure may be in one of them.
    return render(
        request, "500.html", {"request_id": getattr(request, "request_id", "")}, status=500
    )


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    if _is_api(request):
        return _json_error(request, 403, "csrf_failed", f"CSRF check failed: {reason}")
    return render(request, "403.html", {"csrf_reason": reason}, status=403)
