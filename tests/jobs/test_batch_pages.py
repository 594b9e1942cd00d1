"""Batch job pages and API: authorization per route and page, the launcher's live estimate and
launch, the job page's controls, the results viewer, drill-down and export; query counts."""

# ruff: noqa: F811
from __future__ import annotations

import io
import zipfile

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from config.roles import Role
from jobs.batch import services
from jobs.batch.models import BatchJob, BatchTask
from tests.config.test_dashboard import signed_in
from tests.conftest import assert_envelope
from tests.jobs.batch_support import json_model, narratives  # noqa: F401
from tests.jobs.openai_server import fast_gateway, loopback_model, openai_server  # noqa: F401

FRAMEWORKS = ["narrative_salience", "moral_foundations"]


@pytest.fixture
def done_job(narratives, json_model, django_capture_on_commit_callbacks):
    ids = list(narratives.chunks.order_by("pk").values_list("pk", flat=True)[:2])
    with django_capture_on_commit_callbacks(execute=False):
        job = services.job_create(
            user=None,
            corpus_id=narratives.pk,
            selection={"chunk_ids": ids},
            frameworks=FRAMEWORKS,
            models=[json_model.key],
            runs=3,
        )
    services.job_run_inline(job=job)
    job.refresh_from_db()
    return job


def _pages(job: BatchJob) -> list[str]:
    task = job.tasks.first()
    return [
        "/batch/",
        "/batch/new/",
        f"/batch/{job.pk}/",
        f"/batch/{job.pk}/results/",
        f"/batch/{job.pk}/tasks/{task.pk}/",
        f"/batch/{job.pk}/export.zip",
    ]


def test_pages_authorization(done_job):
    for url in _pages(done_job):
        response = Client().get(url)
        assert response.status_code == 302 and "/login/" in response["Location"], url
    viewer, _ = signed_in(Role.VIEWER)
    for url in _pages(done_job):
        expected = 403 if url == "/batch/new/" else 200
        assert viewer.get(url).status_code == expected, url
    assert viewer.post("/batch/new/", {"corpus": str(done_job.corpus_id)}).status_code == 403
    assert viewer.post(f"/batch/{done_job.pk}/", {"action": "cancel"}).status_code == 403
    done_job.refresh_from_db()
    assert done_job.status == BatchJob.Status.COMPLETED
    listing = viewer.get("/batch/").content.decode()
    assert "New batch job" not in listing and done_job.name in listing  # read-only


def test_api_authorization(anon_api, api_as, done_job):
    reads = [
        "jobs",
        f"jobs/{done_job.pk}",
        f"jobs/{done_job.pk}/tasks",
        f"jobs/{done_job.pk}/stats",
        f"jobs/{done_job.pk}/charts",
        f"jobs/{done_job.pk}/export.zip",
        "frameworks",
        f"jobs/{done_job.pk}/openai-batch/requests.jsonl",
    ]
    writes = [
        "jobs",
        "jobs/estimate",
        f"jobs/{done_job.pk}/pause",
        f"jobs/{done_job.pk}/resume",
        f"jobs/{done_job.pk}/cancel",
    ]
    for path in reads:
        assert_envelope(anon_api.get(path), 401)
    for path in writes:
        assert_envelope(anon_api.post(path, json={}), 401)
    viewer = api_as(Role.VIEWER)
    for path in reads:
        assert viewer.get(path).status_code == 200, path
    for path in writes:
        assert_envelope(viewer.post(path, json={}), 403)
    assert BatchJob.objects.count() == 1


def test_launcher_estimates_live_and_launches(
    narratives, json_model, django_capture_on_commit_callbacks
):
    client, user = signed_in(Role.ENGINEER)
    page = client.get("/batch/new/")
    html = page.content.decode()
    assert page.status_code == 200
    assert (
        "Gettysburg Address" in html
        and "Address to Congress" in html
        and json_model.key in html
        and "Moral foundations rubric" in html
    )
    form = {
        "corpus": str(narratives.pk),
        "documents": ["fdr-pearl-harbor", "jfk-inaugural"],
        "frameworks": ["moral_foundations@1.0.0"],
        "models": [json_model.key],
        "runs": "4",
        "max_tokens": "64",
        "temperature": "0.5",
    }
    estimate = client.post(
        "/batch/new/", {**form, "part": "estimate"}, headers={"HX-Request": "true"}
    )
    text = estimate.content.decode()
    assert estimate.status_code == 200 and "fits" in text
    assert '<div class="stat-value" data-tasks>8</div>' in text
    bad = client.post(
        "/batch/new/", {**form, "runs": "30", "part": "estimate"}, headers={"HX-Request": "true"}
    )
    assert "1 to 20" in bad.content.decode()
    refused = client.post("/batch/new/", {**form, "documents": [], "models": []})
    assert refused.status_code == 422 and "Choose at least one model" in refused.content.decode()
    assert BatchJob.objects.count() == 0
    with django_capture_on_commit_callbacks(execute=False) as queued:
        launched = client.post("/batch/new/", {**form, "name": "From the page"})
    job = BatchJob.objects.get()
    assert launched.status_code == 302 and launched["Location"] == f"/batch/{job.pk}/"
    assert job.task_count == 8 and job.created_by == user and job.name == "From the page"
    assert job.frozen["decoding"] == {"temperature": 0.5, "max_tokens": 64}
    assert len(queued) == 1


def test_job_page_controls_and_error_log(
    narratives, json_model, django_capture_on_commit_callbacks
):
    client, _ = signed_in(Role.ENGINEER)
    ids = list(narratives.chunks.order_by("pk").values_list("pk", flat=True)[:1])
    with django_capture_on_commit_callbacks(execute=False):
        job = services.job_create(
            user=None,
            corpus_id=narratives.pk,
            selection={"chunk_ids": ids},
            frameworks=FRAMEWORKS,
            models=[json_model.key],
            runs=2,
        )
    BatchTask.objects.filter(pk=job.tasks.first().pk).update(
        status="failed", error_code="schema_violation", error_message="/care: 12 is greater"
    )
    page = client.get(f"/batch/{job.pk}/").content.decode()
    assert 'data-action="pause"' in page and "schema_violation" in page and "data-error-log" in page
    live = client.get(
        f"/batch/{job.pk}/?part=live&error=schema_violation", headers={"HX-Request": "true"}
    )
    assert live.status_code == 200 and "/care: 12 is greater" in live.content.decode()
    assert "<html" not in live.content.decode()
    client.post(f"/batch/{job.pk}/", {"action": "pause"})
    job.refresh_from_db()
    assert job.status == "paused"
    with django_capture_on_commit_callbacks(execute=False):
        client.post(f"/batch/{job.pk}/", {"action": "resume"})
    job.refresh_from_db()
    assert job.status == "running"
    client.post(f"/batch/{job.pk}/", {"action": "cancel"})
    job.refresh_from_db()
    assert job.status == "cancelled"


def test_results_viewer_drill_down_and_export(done_job):
    client, _ = signed_in(Role.VIEWER)
    html = client.get(f"/batch/{done_job.pk}/results/").content.decode()
    assert "data-per-text" in html and "data-agreement" in html and "batch-charts" in html
    assert "Based on 12 of 12 tasks" in html
    task = done_job.tasks.first()
    drill = client.get(f"/batch/{done_job.pk}/tasks/{task.pk}/").content.decode()
    assert "data-raw" in drill and "data-parsed" in drill and "Passage:" in drill
    export = client.get(f"/batch/{done_job.pk}/export.zip")
    content = b"".join(export.streaming_content) if export.streaming else export.content
    assert zipfile.ZipFile(io.BytesIO(content)).testzip() is None
    assert content == client.get(f"/batch/{done_job.pk}/export.zip").content
    charts = client.get(f"/api/v1/jobs/{done_job.pk}/charts").json()
    assert charts["tasks_done"] == 12 and charts["distribution"] and charts["agreement"]


def test_empty_states(db):
    client, _ = signed_in(Role.ENGINEER)
    assert "No batch jobs yet" in client.get("/batch/").content.decode()
    assert "No corpus yet" in client.get("/batch/new/").content.decode()


def test_the_jobs_list_takes_the_same_queries_for_one_or_many_jobs(
    done_job, json_model, django_capture_on_commit_callbacks
):
    client, _ = signed_in(Role.VIEWER)

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert client.get("/batch/").status_code == 200
        return len(captured.captured_queries)

    one = queries()
    for _ in range(3):
        with django_capture_on_commit_callbacks(execute=False):
            services.job_create(
                user=None,
                corpus_id=done_job.corpus_id,
                selection={"all": True},
                frameworks=["moral_foundations"],
                models=[json_model.key],
                runs=1,
            )
    assert queries() == one
