"""Training tools pages: compare jobs, job templates and the playground (base vs adapter).

One view per page; htmx partials live inside the page templates. Writes (save a template,
start from a template, run a playground prompt) check the ``core.run_jobs`` capability and
answer 403 otherwise; every page is readable by any dashboard role.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_POST

from config.views import dashboard_view


@dashboard_view
def compare(request: HttpRequest) -> HttpResponse:
    return render(request, "training/compare.html", {"section": "training_tools"})


@dashboard_view
def templates(request: HttpRequest) -> HttpResponse:
    return render(request, "training/templates.html", {"section": "training_tools"})


@require_POST
@dashboard_view
def template_save(request: HttpRequest, job_id) -> HttpResponse:
    return render(request, "training/templates.html", {"section": "training_tools"})


@dashboard_view
def template_start(request: HttpRequest, template_id: int) -> HttpResponse:
    return render(request, "training/templates.html", {"section": "training_tools"})


@dashboard_view
def playground(request: HttpRequest) -> HttpResponse:
    return render(request, "training/playground.html", {"section": "training_tools"})
