"""The training pages: the job list (filters, htmx table, pagination) and a job's page.

The builders at the top make jobs in realistic states (transitions, metrics, events,
recoveries); the browser test imports them too.
"""

from __future__ import annotations

import math
import re
import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from config.roles import Role
from tests.factories import PASSWORD, UserFactory
from training import errors as training_errors
from training import services
from training.models import (
    Artifact,
    JobStatus,
    JobTransition,
    MetricPoint,
    Recovery,
    TrainingJob,
    WebhookEvent,
)

S = JobStatus

# --- Builders --------------------------------------------------------------------------------


def make_job(training_file, base_model, preset, *, name, user=None, **fields) -> TrainingJob:
    job = services.training_job_create(
        user=user,
        training_file=training_file,
        base_model=base_model,
        preset=preset,
        name=name,
        notes=fields.pop("notes", ""),
        tags=fields.pop("tags", ()),
    )
    if fields:
        TrainingJob.objects.filter(pk=job.pk).update(**fields)
    return TrainingJob.objects.get(pk=job.pk)


def add_transitions(job: TrainingJob, path: list[tuple[str, str, float]], start) -> None:
    """``path``: (to_status, reason, seconds after ``start``), in order."""
    current = S.PENDING
    TrainingJob.objects.filter(pk=job.pk).update(created_at=start - timedelta(seconds=20))
    for to, reason, offset in path:
        t = JobTransition.objects.create(job=job, from_status=current, to_status=to, reason=reason)
        JobTransition.objects.filter(pk=t.pk).update(at=start + timedelta(seconds=offset))
        current = to


def add_metrics(job: TrainingJob, steps: int, *, until: int | None = None, val_every: int = 10):
    """A plausible loss curve: exponential decay with wiggle, warmup then cosine LR."""
    points = []
    until = steps if until is None else until
    warmup = max(1, steps // 20)
    for step in range(1, until + 1):
        train = 1.15 + 1.9 * math.exp(-step / (steps / 4)) + 0.06 * math.sin(step * 1.7)
        lr = 2e-4 * (
            step / warmup
            if step <= warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        )
        val = 1.32 + 1.7 * math.exp(-step / (steps / 4)) if step % val_every == 0 else None
        points.append(
            MetricPoint(
                job=job,
                step=step,
                epoch=round(step / steps, 3),
                train_loss=round(train, 4),
                val_loss=None if val is None else round(val, 4),
                learning_rate=lr,
                grad_norm=round(0.9 + 0.4 * math.exp(-step / 20), 3),
                tokens_per_second=2150.0 + step,
                gpu_memory_mb=11264.0,
                elapsed_seconds=step * 12.0,
                eta_seconds=(steps - step) * 12.0,
            )
        )
    MetricPoint.objects.bulk_create(points)
    last = points[-1]
    return {
        "step": last.step,
        "epoch": last.epoch,
        "train_loss": last.train_loss,
        "val_loss": next((p.val_loss for p in reversed(points) if p.val_loss), None),
        "learning_rate": last.learning_rate,
        "grad_norm": last.grad_norm,
        "tokens_per_second": last.tokens_per_second,
        "gpu_memory_mb": last.gpu_memory_mb,
        "elapsed_seconds": last.elapsed_seconds,
    }


def add_event(job: TrainingJob, type_: str, data: dict, sequence: int, at=None) -> WebhookEvent:
    event = WebhookEvent.objects.create(
        event_id=uuid.uuid4(),
        job=job,
        type=type_,
        sequence=sequence,
        payload={"job_id": str(job.pk), "type": type_, "sequence": sequence, "data": data},
        processed=True,
    )
    if at is not None:
        WebhookEvent.objects.filter(pk=event.pk).update(received_at=at)
    return event


DATASET_REPORT = {
    "conversations": 120,
    "train_conversations": 96,
    "val_conversations": 24,
    "train_examples": 96,
    "train_tokens": 148_220,
    "val_tokens": 36_904,
    "truncated_examples": 2,
    "max_seq_length": 1024,
    "total_steps": 60,
}


def completed_job(training_file, base_model, preset, *, user=None, name="Advisor v3", steps=60):
    now = timezone.now()
    start = now - timedelta(minutes=16)
    job = make_job(
        training_file, base_model, preset, name=name, user=user, tags=["advisor", "prod"]
    )
    latest = add_metrics(job, steps)
    add_transitions(
        job,
        [
            (S.QUEUED, f"started by {user or 'system'}", 0),
            (S.PROVISIONING, "launching", 4),
            (S.PREPROCESSING, "worker stage", 19),
            (S.MODEL_LOADING, "worker stage", 31),
            (S.TRAINING, "worker stage", 52),
            (S.RECOVERING, "worker exited without a completed or error event (exit code -9)", 400),
            (S.PROVISIONING, "relaunching after interruption", 409),
            (S.TRAINING, "worker stage", 440),
            (S.FINALIZATION, "worker completed", 880),
            (S.COMPLETED, "worker completed", 905),
        ],
        start,
    )
    Recovery.objects.create(
        job=job,
        reason="worker exited without a completed or error event (exit code -9)",
        detected_at=start + timedelta(seconds=400),
        relaunched_at=start + timedelta(seconds=408.6),
        from_step=24,
    )
    Artifact.objects.create(job=job, kind=Artifact.Kind.ADAPTER, storage_path="x/adapter")
    events = [
        ("started", {}),
        ("stage", {"stage": "preprocessing"}),
        ("dataset", DATASET_REPORT),
        ("stage", {"stage": "model_loading"}),
        ("stage", {"stage": "training"}),
        *[("metrics", {"step": s, "train_loss": 2.0 - s / 100}) for s in range(1, 9)],
        ("checkpoint", {"step": 24, "uri": "file:///ckpt/24"}),
        ("resume_check", {"passed": True, "message": "step and LR match"}),
        ("completed", {"perplexity": {"baseline": 24.5, "trained": 16.8}}),
    ]
    for i, (kind, data) in enumerate(events):
        add_event(job, kind, data, i, at=start + timedelta(seconds=10 * i))
    TrainingJob.objects.filter(pk=job.pk).update(
        status=S.COMPLETED,
        progress=100.0,
        current_step=steps,
        total_steps=steps,
        current_epoch=1.0,
        latest_metrics=latest,
        eta_seconds=0,
        attempt=2,
        recovery_count=1,
        started_at=start + timedelta(seconds=4),
        completed_at=start + timedelta(seconds=905),
        perplexity_baseline=24.5,
        perplexity_trained=16.8,
        final_train_loss=1.2046,
        final_val_loss=1.3391,
        dataset_report=DATASET_REPORT,
        resume_check={
            "passed": True,
            "message": "Resumed at step 24 with the expected learning rate.",
            "resumed_from_step": 24,
            "expected_step": 25,
            "actual_step": 25,
            "expected_learning_rate": 0.000163,
            "actual_learning_rate": 0.000163,
            "last_logged_loss": 1.62,
            "first_loss_after_resume": 1.61,
        },
        cost_actual=0.42,
        cost_estimate=0.55,
    )
    return TrainingJob.objects.get(pk=job.pk)


def running_job(training_file, base_model, preset, *, user=None, name="Advisor v4 (long)"):
    now = timezone.now()
    start = now - timedelta(minutes=6)
    job = make_job(training_file, base_model, preset, name=name, user=user, tags=["advisor"])
    latest = add_metrics(job, 200, until=87)
    add_transitions(
        job,
        [
            (S.QUEUED, "started", 0),
            (S.PROVISIONING, "launching", 3),
            (S.PREPROCESSING, "worker stage", 15),
            (S.MODEL_LOADING, "worker stage", 26),
            (S.TRAINING, "worker stage", 44),
        ],
        start,
    )
    TrainingJob.objects.filter(pk=job.pk).update(
        status=S.TRAINING,
        progress=43.5,
        current_step=87,
        total_steps=200,
        current_epoch=0.435,
        latest_metrics=latest,
        eta_seconds=1356,
        attempt=1,
        started_at=start + timedelta(seconds=3),
        dataset_report={**DATASET_REPORT, "total_steps": 200},
    )
    return TrainingJob.objects.get(pk=job.pk)


def failed_oom_job(training_file, base_model, preset, *, user=None, name="Advisor 7B batch 4"):
    now = timezone.now()
    start = now - timedelta(minutes=40)
    job = make_job(
        training_file, base_model, preset, name=name, user=user, notes="bigger batch test"
    )
    hp = {
        **job.configuration["hyperparameters"],
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 2,
    }
    config = {**job.configuration, "hyperparameters": hp}
    details = {"micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_seq_length": 1024}
    message = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.64 GiB total capacity)"
    classified = training_errors.classify("OutOfMemoryError", message, details, config)
    add_transitions(
        job,
        [
            (S.QUEUED, "started", 0),
            (S.PROVISIONING, "launching", 3),
            (S.PREPROCESSING, "worker stage", 14),
            (S.MODEL_LOADING, "worker stage", 22),
            (S.TRAINING, "worker stage", 41),
            (S.FAILED, "OutOfMemoryError", 58),
        ],
        start,
    )
    latest = add_metrics(job, 60, until=3)
    add_event(job, "stage", {"stage": "training"}, 0, at=start + timedelta(seconds=41))
    add_event(
        job,
        "error",
        {"error_type": "OutOfMemoryError", "message": message, "details": details},
        1,
        at=start + timedelta(seconds=58),
    )
    TrainingJob.objects.filter(pk=job.pk).update(
        configuration=config,
        status=S.FAILED,
        progress=5.0,
        current_step=3,
        total_steps=60,
        current_epoch=0.05,
        latest_metrics=latest,
        attempt=1,
        started_at=start + timedelta(seconds=3),
        completed_at=start + timedelta(seconds=58),
        error_type=classified.error_type,
        error_message=classified.message,
        error_details={
            **details,
            "title": classified.title,
            "fix": classified.fix,
            "suggested_changes": classified.changes,
            "retryable": classified.retryable,
            "traceback": "Traceback (most recent call last):\n  ...\n"
            "torch.OutOfMemoryError: CUDA out of memory.",
        },
    )
    return TrainingJob.objects.get(pk=job.pk)


def seed_jobs(training_file, base_model, preset, *, user=None) -> dict[str, TrainingJob]:
    """One job in each interesting state."""
    jobs = {
        "pending": make_job(
            training_file, base_model, preset, name="Draft run", user=user, notes="not yet"
        ),
        "queued": make_job(
            training_file, base_model, preset, name="Queued run", user=user, status=S.QUEUED
        ),
        "running": running_job(training_file, base_model, preset, user=user),
        "failed": failed_oom_job(training_file, base_model, preset, user=user),
        "cancelled": make_job(
            training_file,
            base_model,
            preset,
            name="Cancelled sweep",
            user=user,
            status=S.CANCELLED,
            progress=20.0,
            current_step=12,
            total_steps=60,
        ),
        "completed": completed_job(training_file, base_model, preset, user=user),
    }
    return jobs


# --- Helpers ---------------------------------------------------------------------------------


def signed_in(role=Role.VIEWER, **kwargs) -> tuple[Client, object]:
    user = UserFactory(role=role)
    client = Client(**kwargs)
    assert client.login(username=user.username, password=PASSWORD)
    return client, user


def html_of(response) -> str:
    assert response.status_code == 200, response.status_code
    return response.content.decode()


def count_queries(client, url, **kwargs) -> int:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url, **kwargs)
    assert response.status_code == 200
    return len(ctx.captured_queries)


HTMX = {"HX-Request": "true"}


@pytest.fixture
def jobs(training_file, smollm, smoke):
    return seed_jobs(training_file, smollm, smoke)


# --- Access ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_anonymous_is_sent_to_login(jobs):
    anonymous = Client()
    for url in ("/training/", f"/training/{jobs['completed'].pk}/"):
        response = anonymous.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/login/?next=")


@pytest.mark.django_db
def test_a_user_without_a_role_gets_403(jobs):
    client, _ = signed_in(role=None)
    assert client.get("/training/").status_code == 403
    assert client.get(f"/training/{jobs['completed'].pk}/").status_code == 403


@pytest.mark.django_db
def test_unknown_job_is_a_404_page():
    client, _ = signed_in()
    response = client.get(f"/training/{uuid.uuid4()}/")
    assert response.status_code == 404
    assert b"Page not found" in response.content
    assert client.get("/training/not-a-uuid/").status_code == 404


# --- List ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_list_shows_every_state_to_a_viewer(jobs):
    client, _ = signed_in(Role.VIEWER)
    html = html_of(client.get("/training/"))
    for job in jobs.values():
        assert f'href="/training/{job.pk}/"' in html
        assert f'data-status="{job.status}"' in html
    for badge in ("badge-pending", "badge-queued", "badge-training", "badge-failed"):
        assert badge in html
    assert "badge-cancelled" in html and "badge-completed" in html
    assert "Interrupted 1x, resumed successfully" in html
    assert "24.5" in html and "16.8" in html and "\u221231%" in html
    assert "OutOfMemoryError" in html
    assert "Step <strong>87</strong> / 200" in html
    assert 'style="width: 43.5%"' in html
    assert "SmolLM2" in html and "Smoke" in html
    # Viewers read; they get no action buttons.
    assert "data-job-action" not in html and "hx-post" not in html
    # A job is running: the table refreshes itself.
    assert 'hx-trigger="every 5s"' in html


@pytest.mark.django_db
def test_engineers_get_cancel_and_retry_in_the_list(jobs):
    client, _ = signed_in(Role.ENGINEER)
    html = html_of(client.get("/training/"))
    assert f'hx-post="/api/v1/training/jobs/{jobs["running"].pk}/cancel"' in html
    assert f'hx-post="/api/v1/training/jobs/{jobs["failed"].pk}/retry"' in html
    assert f'hx-post="/api/v1/training/jobs/{jobs["cancelled"].pk}/retry"' in html
    assert f"/api/v1/training/jobs/{jobs['completed'].pk}/retry" not in html


@pytest.mark.django_db
def test_the_list_stops_refreshing_when_nothing_is_active(training_file, smollm, smoke):
    completed_job(training_file, smollm, smoke)
    client, _ = signed_in()
    html = html_of(client.get("/training/"))
    assert "every 5s" not in html and "data-live" not in html


@pytest.mark.django_db
def test_empty_list_explains_how_to_start():
    client, _ = signed_in()
    html = html_of(client.get("/training/"))
    assert "No training jobs yet" in html and "manage.py train" in html


@pytest.mark.django_db
def test_list_queries_do_not_grow_with_the_number_of_jobs(training_file, smollm, smoke):
    client, _ = signed_in()
    seed_jobs(training_file, smollm, smoke, user=UserFactory(role=Role.ENGINEER))
    few = count_queries(client, "/training/")
    for i in range(12):
        make_job(
            training_file,
            smollm,
            smoke,
            name=f"Extra {i}",
            user=UserFactory(role=Role.ENGINEER),
            status=S.COMPLETED,
            perplexity_baseline=20.0,
            perplexity_trained=15.0,
            recovery_count=i % 3,
        )
    many = count_queries(client, "/training/")
    assert many == few, (few, many)
    assert many <= 12
    assert count_queries(client, "/training/", headers={**HTMX, "HX-Target": "training-jobs"}) <= 9


@pytest.mark.django_db
def test_filters_by_status_search_and_preset(jobs, training_file, smollm):
    from training.models import Preset

    balanced = Preset.objects.get(key="balanced")
    other = make_job(training_file, smollm, balanced, name="Balanced one", tags=["client-x"])
    client, _ = signed_in()

    def names(query: str) -> set[str]:
        html = html_of(client.get(f"/training/?{query}"))
        return set(re.findall(r'class="job-name" href="[^"]+" title="([^"]+)"', html))

    assert names("status=failed") == {jobs["failed"].name}
    assert names("status=active") == {jobs["queued"].name, jobs["running"].name}
    assert names("q=bigger+batch") == {jobs["failed"].name}  # in the notes
    assert names("q=client-x") == {other.name}  # a tag
    assert names("q=sweep") == {jobs["cancelled"].name}  # the name
    assert names("preset=balanced") == {other.name}
    assert names("preset=smoke&status=completed") == {jobs["completed"].name}
    assert names("status=bogus") == {j.name for j in [*jobs.values(), other]}
    html = html_of(client.get("/training/?q=nothing-like-this"))
    assert "No jobs match these filters" in html


@pytest.mark.django_db
def test_htmx_request_gets_only_the_table(jobs):
    client, _ = signed_in()
    response = client.get(
        "/training/?status=failed", headers={**HTMX, "HX-Target": "training-jobs"}
    )
    html = html_of(response)
    assert html.lstrip().startswith('<div id="training-jobs"')
    assert "<html" not in html and 'role="search"' not in html
    assert jobs["failed"].name in html and jobs["completed"].name not in html
    assert "HX-Request" in response["Vary"]
    # Nothing active among the failed ones: no polling in the returned table.
    assert "every 5s" not in html
    # The filter form targets that table and pushes the URL.
    page = html_of(client.get("/training/"))
    assert 'hx-target="#training-jobs"' in page and 'hx-push-url="true"' in page


@pytest.mark.django_db
def test_pagination_keeps_the_filters(training_file, smollm, smoke):
    for i in range(30):
        make_job(training_file, smollm, smoke, name=f"Sweep {i:02d}", status=S.COMPLETED)
    client, _ = signed_in()
    first = html_of(client.get("/training/?status=completed"))
    assert first.count('class="job-name"') == 25
    assert "Showing 1\u201325 of 30" in first
    assert "?status=completed&amp;page=2" in first
    second = html_of(client.get("/training/?status=completed&page=2"))
    assert second.count('class="job-name"') == 5
    assert "Page 2 of 2" in second
    assert html_of(client.get("/training/?page=99")).count('class="job-name"') == 5


# --- Detail ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_completed_job_page(jobs):
    job = jobs["completed"]
    client, _ = signed_in(Role.VIEWER)
    html = html_of(client.get(f"/training/{job.pk}/"))
    assert "Perplexity: 24.5 → 16.8 (31% improvement)" in html
    for section in ("Results", "Loss and learning rate", "Latest metrics", "Stages", "Recoveries"):
        assert f">{section}</h2>" in html, section
    for section in ("Configuration", "Dataset", "Event log", "Validation"):
        assert f">{section}</h2>" in html, section
    assert "Not validated yet." in html  # the validation card, before any run
    # Downloads, for everyone who may read.
    api = f"/api/v1/training/jobs/{job.pk}"
    assert f'href="{api}/download/adapters"' in html
    assert f'href="{api}/download/metrics?format=csv"' in html
    assert f'href="{api}/download/deployment-package"' in html
    # Resume check, recoveries, dataset report, configuration.
    assert "Resume check passed" in html
    assert "exit code -9" in html and "8.6 s" in html
    assert "Interrupted 1x, resumed successfully" in html
    assert "148,220" in html and "Validation conversations" in html
    assert "lora_r" in html and "micro_batch_size" in html and "Effective batch" in html
    # Stage timeline, with durations.
    for label in ("Queued", "Provisioning", "Preprocessing", "Loading model", "Recovering"):
        assert f'<span class="tl-label">{label}</span>' in html
    assert "7m 20s" in html  # training from 440 s to finalization at 880 s
    # The chart draws from its JSON endpoint: every step, validation loss and learning rate.
    config = chart_config(html)
    assert config["url"] == f"/training/{job.pk}/chart/" and config["active"] is False
    chart = client.get(config["url"]).json()
    assert len(chart["train"]) == 60 and len(chart["lr"]) == 60 and len(chart["val"]) == 6
    assert chart["train"][0][0] == 1 and chart["train"][-1][0] == 60
    assert chart["downsampled"] is False and chart["status"] == "completed"
    assert "/static/vendor/chartjs/chart.umd.min.js" in html
    # Latest metrics.
    assert "Tokens / s" in html and "11.0 GiB" in html
    # The event log: latest 50 at most, newest first, with the payload.
    assert html.count('<details class="payload">') == 16
    assert "perplexity 24.5 → 16.8" in html
    # A viewer gets no actions.
    assert "data-job-action" not in html and "hx-post" not in html


@pytest.mark.django_db
def test_every_state_has_a_detail_page(jobs):
    engineer, _ = signed_in(Role.ENGINEER)
    viewer, _ = signed_in(Role.VIEWER)
    for state, job in jobs.items():
        html = html_of(engineer.get(f"/training/{job.pk}/"))
        assert f'id="job-badge" class="badge badge-{job.status} badge-lg">' in html, state
        assert "hx-post" not in html_of(viewer.get(f"/training/{job.pk}/")), state
    pending = html_of(engineer.get(f"/training/{jobs['pending'].pk}/"))
    assert "No dataset report yet" in pending and "The curve appears" in pending
    assert f'hx-post="/api/v1/training/jobs/{jobs["pending"].pk}/cancel"' in pending
    cancelled = html_of(engineer.get(f"/training/{jobs['cancelled'].pk}/"))
    assert f'hx-post="/api/v1/training/jobs/{jobs["cancelled"].pk}/retry"' in cancelled
    assert "No metrics were logged for this job." in cancelled


@pytest.mark.django_db
def test_running_job_page_follows_the_job(jobs):
    job = jobs["running"]
    client, _ = signed_in(Role.ENGINEER)
    html = html_of(client.get(f"/training/{job.pk}/"))
    assert f'hx-post="/api/v1/training/jobs/{job.pk}/cancel"' in html
    assert "/retry" not in html
    assert f"/training/{job.pk}/?part=status&amp;live=1" in html
    config = chart_config(html)  # the chart polls its endpoint for new steps
    assert config["active"] is True and config["total_steps"] == 200
    assert "43.5%" in html or "44%" in html
    assert "87" in html and "/ 200" in html
    assert "22m 36s" in html  # the ETA
    assert "so far" in html  # the current stage's duration
    assert "download/adapters" not in html


@pytest.mark.django_db
def test_status_partial_and_refresh_when_finished(jobs):
    running = jobs["running"]
    client, _ = signed_in()
    url = f"/training/{running.pk}/?part=status&live=1"
    html = html_of(client.get(url, headers=HTMX))
    assert html.lstrip().startswith('<section id="job-status"')
    assert "<html" not in html and "every 5s" in html
    # The stage badge, the stage list and the event log follow along out of band.
    for oob in ('id="job-badge" hx-swap-oob="true"', 'id="job-stages" hx-swap-oob="true"'):
        assert oob in html, oob
    assert 'id="event-log" hx-swap-oob="true"' in html
    assert 'id="job-dataset" hx-swap-oob="true"' in html and "148,220" in html
    assert "Cost so far" in html
    filtered = html_of(client.get(f"{url}&event_type=checkpoint", headers=HTMX))
    assert "No checkpoint events" in filtered or "event-checkpoint" in filtered
    latest = html_of(client.get(f"/training/{running.pk}/?part=latest", headers=HTMX))
    assert latest.lstrip().startswith('<section id="job-latest"') and "Train loss" in latest
    assert "hx-swap-oob" not in latest
    TrainingJob.objects.filter(pk=running.pk).update(status=S.COMPLETED)
    done = client.get(url, headers=HTMX)
    # Finished: the whole page body is swapped in place, no reload.
    assert done.status_code == 200 and "HX-Refresh" not in done
    assert done["HX-Retarget"] == "#content" and done["HX-Reselect"] == "#content"
    body = html_of(done)
    assert 'id="content"' in body and 'id="job-actions"' in body
    assert "every 5s" not in body


@pytest.mark.django_db
def test_failed_oom_job_shows_the_fix_and_a_labelled_retry(jobs):
    job = jobs["failed"]
    engineer, _ = signed_in(Role.ENGINEER)
    html = html_of(engineer.get(f"/training/{job.pk}/"))
    assert "OutOfMemoryError" in html and "Out of GPU memory" in html
    assert "micro_batch_size=4 with sequences of 1024 tokens" in html
    assert "Retry with micro_batch_size=2 and gradient_accumulation_steps=4" in html  # the fix
    assert "Retry with micro_batch_size=2, gradient_accumulation_steps=4" in html  # the button
    assert '<span class="diff-old">4</span>' in html and '<span class="diff-new">2</span>' in html
    assert "Worker traceback" in html
    assert f'hx-post="/api/v1/training/jobs/{job.pk}/retry"' in html
    viewer, _ = signed_in(Role.VIEWER)
    viewer_html = html_of(viewer.get(f"/training/{job.pk}/"))
    assert "How to fix it" in viewer_html and "hx-post" not in viewer_html


@pytest.mark.django_db
def test_dataset_error_through_the_webhook_shows_row_and_field(
    training_file, smollm, smoke, fake_executor, post_event
):
    job = services.training_job_create(
        user=None, training_file=training_file, base_model=smollm, preset=smoke, name="Bad rows"
    )
    services.training_job_start(job=job, user=None)
    post_event(job, "stage", {"stage": "preprocessing"}, sequence=1)
    post_event(
        job,
        "error",
        {
            "error_type": "DatasetFormatError",
            "message": "Row 47 (conversation conv-047): target_response is missing",
            "details": {
                "row": 47,
                "conversation_id": "conv-047",
                "field": "training_pairs[2].target_response",
            },
        },
        sequence=2,
    )
    client, _ = signed_in(Role.ENGINEER)
    html = html_of(client.get(f"/training/{job.pk}/"))
    assert "DatasetFormatError" in html and "The training file has a problem" in html
    assert "Row (line)" in html and ">47<" in html and "conv-047" in html
    assert "training_pairs[2].target_response" in html
    assert "Fix that row of the training file" in html
    # Retrying the same file would fail the same way: no retry offered.
    assert "/retry" not in html
    # The event log filter returns only that type, as an htmx partial.
    part = client.get(
        f"/training/{job.pk}/?event_type=error", headers={**HTMX, "HX-Target": "event-log"}
    )
    part_html = html_of(part)
    assert part_html.lstrip().startswith('<div id="event-log"')
    assert part_html.count('<details class="payload">') == 1
    assert "DatasetFormatError: Row 47" in part_html


@pytest.mark.django_db
def test_detail_queries_do_not_grow_with_metrics_and_events(training_file, smollm, smoke):
    client, _ = signed_in()
    job = completed_job(training_file, smollm, smoke, steps=20)
    few = count_queries(client, f"/training/{job.pk}/")
    MetricPoint.objects.filter(job=job).delete()
    add_metrics(job, 400)
    for i in range(80):
        add_event(job, "heartbeat", {"step": i, "stage": "training"}, 100 + i)
    Recovery.objects.create(job=job, reason="spot reclaimed", detected_at=timezone.now())
    many = count_queries(client, f"/training/{job.pk}/")
    assert many == few, (few, many)
    assert many <= 16
    html = html_of(client.get(f"/training/{job.pk}/"))
    assert html.count('<details class="payload">') == 50


@pytest.mark.django_db
def test_retry_from_the_page_goes_through_the_api_with_the_csrf_token(
    training_file, smollm, smoke, fake_executor
):
    job = failed_oom_job(training_file, smollm, smoke)
    client, user = signed_in(Role.ENGINEER, enforce_csrf_checks=True)
    html = html_of(client.get(f"/training/{job.pk}/"))
    token = re.search(r'hx-headers=\'\{"X-CSRFToken": "([^"]+)"\}\'', html).group(1)
    assert client.post(f"/api/v1/training/jobs/{job.pk}/retry").status_code == 403
    response = client.post(f"/api/v1/training/jobs/{job.pk}/retry", headers={"X-CSRFToken": token})
    assert response.status_code == 201, response.content
    retry = TrainingJob.objects.get(pk=response.json()["id"])
    assert retry.retry_of_id == job.pk and retry.created_by == user
    assert retry.configuration["hyperparameters"]["micro_batch_size"] == 2
    retry_html = html_of(client.get(f"/training/{retry.pk}/"))
    assert "Retry of" in retry_html and job.name in retry_html
    assert (
        '<div class="config-item is-changed"><dt class="mono">micro_batch_size</dt>' in retry_html
    )
    assert "Retried as" in html_of(client.get(f"/training/{job.pk}/"))


# --- Helpers' units --------------------------------------------------------------------------


def test_durations_read_naturally():
    from training.views import format_duration

    assert format_duration(None) == ""
    assert format_duration(42.4) == "42s"
    assert format_duration(185) == "3m 05s"
    assert format_duration(2 * 3600 + 14 * 60) == "2h 14m"
    assert format_duration(3 * 86400 + 4 * 3600) == "3d 4h"


def chart_config(html: str) -> dict:
    import json

    data = re.search(r'<script id="job-chart-config" type="application/json">(.*?)</script>', html)
    assert data, "no chart configuration on the page"
    return json.loads(data.group(1))
