"""The chat page (/chat/) and the feedback analysis page (/chat/feedback/).

The chat page talks to the public API from the browser (static/js/chat.js): the streamed
answer from ``POST /v1/chat/completions`` (session auth, CSRF header; a true stream from
``gateway.chat_stream``, chunks shown as the model writes them; an ``error`` event mid-answer
shows the retryable error state) and feedback through
``POST /v1/feedback``. The feedback page shows ratings and tags per model and turns chosen
feedback into a training file (and a Smoke job) through jobs/serving.py.
"""

from __future__ import annotations

import re
import uuid

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse

from config.auth import has_capability
from config.errors import CrucibleError
from config.views import dashboard_view
from jobs import serving
from jobs.models import Feedback, FeedbackTrainingFile, RegisteredModel
from jobs.public_api import CHAT_CAPABILITIES

SECTION = "chat"
FEEDBACK_ROWS = 50


def _can_chat(user) -> bool:
    return any(has_capability(user, c) for c in CHAT_CAPABILITIES)


def model_choices() -> dict:
    """Chat models for the picker: base and external models by provider, adapters grouped
    under their training job (two queries)."""
    from training.models import TrainingJob

    rows = list(
        RegisteredModel.objects.enabled()
        .with_capability("chat")
        .select_related("provider")
        .order_by("provider__slug", "key")
    )

    def job_id(m: RegisteredModel) -> str | None:
        found = re.fullmatch(r"crucible-([0-9a-fA-F-]{32,36})", m.remote_id)
        if not (m.parent and found):
            return None
        try:
            return str(uuid.UUID(found.group(1)))
        except ValueError:
            return None

    job_ids = [i for i in map(job_id, rows) if i]
    jobs = {str(j.pk): j for j in TrainingJob.objects.filter(pk__in=job_ids).only("id", "name")}
    bases: dict[str, list] = {}
    adapters = []
    for m in rows:
        found = job_id(m)
        job = jobs.get(found) if found else None
        if m.parent:
            adapters.append({"model": m, "job": job})
        else:
            bases.setdefault(m.provider.name, []).append(m)
    return {"bases": bases, "adapters": adapters}


@dashboard_view
def chat_page(request: HttpRequest) -> HttpResponse:
    choices = model_choices()
    profiles = serving.profiles_sync()
    latest: dict[str, object] = {}
    for p in profiles:  # newest version of each name first (ordering: name, -version)
        latest.setdefault(p.name, p)
    first_base = next(iter(choices["bases"].values()), [None])[0]
    return render(
        request,
        "jobs/chat.html",
        {
            "section": SECTION,
            "choices": choices,
            "profiles": profiles,
            "default_profile": latest.get(serving.DEFAULT_PROFILE),
            "default_model": request.GET.get("model") or (first_base.key if first_base else ""),
            "can_chat": _can_chat(request.user),
            "tags": serving.FEEDBACK_TAGS,
        },
    )


@dashboard_view
def feedback_page(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        if not _can_chat(request.user):
            return render(request, "403.html", {}, status=403)
        ids = [int(i) for i in request.POST.getlist("feedback") if i.isdigit()]
        try:
            if not ids:
                raise CrucibleError("Choose at least one feedback row.")
            lineage = serving.feedback_training_file_create(feedback_ids=ids, user=request.user)
            if request.POST.get("action") == "train":
                job = serving.feedback_training_job_start(lineage=lineage, user=request.user)
                messages.success(
                    request,
                    f"Training file v{lineage.version} made from {len(ids)} feedback rows; "
                    f"Smoke job '{job.name}' queued.",
                )
                return redirect(reverse("training:detail", args=[job.pk]))
            messages.success(
                request,
                f"Training file v{lineage.version} made "
                f"({lineage.training_file.conversation_count} conversations).",
            )
        except CrucibleError as exc:
            messages.error(request, exc.message)
        return redirect(reverse("chat:feedback"))
    summary = serving.feedback_summary(days=int(request.GET.get("days") or 30))
    rows = list(
        Feedback.objects.select_related("response", "response__profile", "user")
        .prefetch_related("training_files")
        .order_by("-created_at")[:FEEDBACK_ROWS]
    )
    files = list(
        FeedbackTrainingFile.objects.select_related("training_file")
        .prefetch_related("feedback")
        .order_by("-version")[:10]
    )
    return render(
        request,
        "jobs/chat_feedback.html",
        {
            "section": SECTION,
            "summary": summary,
            "rows": rows,
            "files": files,
            "can_chat": _can_chat(request.user),
            "teaches": {f.pk for f in rows if serving.feedback_conversation(f)},
        },
    )
