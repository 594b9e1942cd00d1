"""The new-job form: defaults, the live estimate, validation, the review step and Start."""

from __future__ import annotations

import io
import json
import re

import pytest

from config.errors import Conflict
from config.roles import Role
from tests.training.test_pages import HTMX, html_of, signed_in
from training.models import JobStatus, JobTemplate, TrainingJob

pytestmark = pytest.mark.django_db


@pytest.fixture
def no_launch(monkeypatch):
    launched = []
    monkeypatch.setattr("training.services._enqueue_launch", lambda job: launched.append(job.pk))
    return launched


@pytest.fixture
def bad_file(db):
    from corpora.services import training_file_create

    record = {
        "id": "x",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "?"},
        ],
    }
    return training_file_create(
        name="unfinished", upload=io.BytesIO(json.dumps(record).encode() + b"\n"), user=None
    )


def form_data(training_file, **changes) -> dict:
    data = {
        "training_file": str(training_file.pk),
        "base_model": "SmolLM2-135M-Instruct",
        "preset": "smoke",
        "executor": "local",
        "capacity": "spot",
        "name": "From the form",
        "description": "",
        "notes": "checking the form",
        "tags": "Experiment, smoke",
    }
    return {**data, **changes}


def test_viewers_and_analysts_may_not_open_it(training_file):
    for role in (Role.VIEWER, Role.ANALYST):
        client, _ = signed_in(role)
        assert client.get("/training/new/").status_code == 403
        response = client.post("/training/new/", form_data(training_file, action="start"))
        assert response.status_code == 403
    assert not TrainingJob.objects.exists()
    viewer, _ = signed_in(Role.VIEWER)
    assert "/training/new/" not in html_of(viewer.get("/training/"))


def test_the_form_starts_with_the_newest_ready_file_balanced_and_an_estimate(training_file):
    client, _ = signed_in(Role.ENGINEER)
    html = html_of(client.get("/training/new/"))
    assert f'<option value="{training_file.pk}" selected>' in html
    assert "6 conversations" in html and "ready" in html  # size and state in the dropdown
    assert re.search(r'name="preset" value="balanced"\s+checked', html)
    for preset in ("Conservative", "Balanced", "Aggressive", "Smoke test"):
        assert f'<span class="preset-name">{preset}</span>' in html
    assert "Best for:" in html and "242-conversation" not in html
    # Each card quotes the chosen file's figures, not the seed dataset's (test_small_fixes).
    assert re.search(
        r'id="preset-figures-balanced"[^>]*><strong>On advisor:</strong> \d+ step', html
    )
    assert 'data-estimate="duration"' in html and "No provider charge" in html
    assert "Validated: 6 conversations" in html
    # Advanced overrides behind a toggle, each with its help text.
    assert '<details class="advanced">' in html
    assert "Lower it after an out-of-memory error." in html
    # The estimate follows every change through htmx.
    assert 'hx-get="/training/new/?part=estimate"' in html and 'hx-include="#new-job-form"' in html


def test_the_estimate_partial_follows_the_selection(training_file):
    client, _ = signed_in(Role.ENGINEER)

    def estimate(**changes) -> str:
        params = {**form_data(training_file), "part": "estimate", **changes}
        return html_of(client.get("/training/new/", params, headers=HTMX))

    balanced, smoke = estimate(preset="balanced"), estimate(preset="smoke")
    assert balanced.lstrip().startswith('<aside id="estimate"')
    assert "<html" not in balanced and 'hx-swap-oob="true"' in balanced
    steps = re.compile(r"Optimizer steps</dt><dd class=\"num\">([\d,]+)<")
    assert steps.search(smoke).group(1) == "12"
    assert steps.search(balanced).group(1) != "12"
    overridden = estimate(advanced="on", hp_max_steps="30")
    assert steps.search(overridden).group(1) == "30"
    bad = estimate(advanced="on", hp_learning_rate="5")
    assert "Learning rate" in bad and "less than or equal to 0.01" in bad
    assert "Choose a training file" in estimate(training_file="")


def test_a_file_with_problems_blocks_start_and_shows_why_with_its_first_rows(
    training_file, bad_file, no_launch
):
    client, _ = signed_in(Role.ENGINEER)
    part = html_of(
        client.get(
            "/training/new/",
            {**form_data(bad_file), "part": "estimate"},
            headers=HTMX,
        )
    )
    assert "unfinished cannot be trained on" in part
    assert "assistant turn" in part
    assert "First rows of the file" in part and "&quot;role&quot;: &quot;user&quot;" in part
    response = client.post("/training/new/", form_data(bad_file, action="start"))
    assert response.status_code == 400
    html = response.content.decode()
    assert "has problems and cannot be trained on: line 1" in html
    assert "First rows of the file" in html
    assert not TrainingJob.objects.exists() and no_launch == []


def test_review_creates_nothing_then_start_creates_and_starts(training_file, no_launch):
    client, user = signed_in(Role.ENGINEER)
    review = client.post("/training/new/", form_data(training_file, action="review"))
    html = html_of(review)
    assert 'id="review"' in html and "From the form" in html and "Smoke test" in html
    assert '<input type="hidden" name="preset" value="smoke">' in html
    assert "Start training" in html
    assert not TrainingJob.objects.exists()
    # Back to the form keeps the values.
    back = html_of(client.post("/training/new/", form_data(training_file, action="edit")))
    assert re.search(r'name="preset" value="smoke"\s+checked', back)
    assert 'value="From the form"' in back and "Check the highlighted" not in back

    response = client.post("/training/new/", form_data(training_file, action="start"))
    job = TrainingJob.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/training/{job.pk}/"
    assert job.status == JobStatus.QUEUED and no_launch == [job.pk]
    assert job.name == "From the form" and job.preset.key == "smoke"
    assert job.tags == ["experiment", "smoke"] and job.notes == "checking the form"
    assert job.created_by == user and job.executor == "local" and job.spot is False
    assert job.configuration["hyperparameters"]["max_steps"] == 12
    page = html_of(client.get(response["Location"]))
    assert "is queued" in page


def test_overrides_apply_only_with_the_toggle_and_are_validated(training_file, no_launch):
    client, _ = signed_in(Role.ENGINEER)
    off = form_data(training_file, action="start", hp_learning_rate="0.0005")
    client.post("/training/new/", off)
    assert TrainingJob.objects.get().configuration["hyperparameters"]["learning_rate"] == 1e-3
    TrainingJob.objects.all().delete()
    invalid = client.post(
        "/training/new/",
        form_data(training_file, action="review", advanced="on", hp_micro_batch_size="0"),
    )
    assert invalid.status_code == 400
    html = invalid.content.decode()
    assert "Check the highlighted fields" in html and "greater than or equal to 1" in html
    on = form_data(training_file, action="start", advanced="on", hp_learning_rate="0.0005")
    assert client.post("/training/new/", on).status_code == 302
    assert TrainingJob.objects.get().configuration["hyperparameters"]["learning_rate"] == 5e-4


def test_runpod_is_refused_when_not_configured(training_file, settings, no_launch):
    settings.RUNPOD_API_KEY = ""
    client, _ = signed_in(Role.ENGINEER)
    html = html_of(client.get("/training/new/"))
    assert 'value="runpod" disabled' in html and "Not configured here" in html
    response = client.post(
        "/training/new/", form_data(training_file, action="start", executor="runpod")
    )
    assert response.status_code == 400
    assert "RunPod is not configured on this installation" in response.content.decode()
    assert not TrainingJob.objects.exists()


def test_a_refused_start_writes_nothing_and_says_why(training_file, monkeypatch, no_launch):
    def refuse(**kwargs):
        raise Conflict("Starting this job would take November 2026 over its budget.")

    monkeypatch.setattr("training.services.hooks.before_start", refuse)
    client, _ = signed_in(Role.ENGINEER)
    response = client.post("/training/new/", form_data(training_file, action="start"))
    assert response.status_code == 409
    html = response.content.decode()
    assert "The job was not started." in html and "over its budget" in html
    assert 'id="review"' in html  # still on the review, ready to try again
    assert not TrainingJob.objects.exists()


def test_a_template_or_a_job_prefills_the_form(training_file, smollm, smoke):
    template = JobTemplate.objects.create(
        name="Production",
        base_model=smollm,
        preset=smoke,
        overrides={"learning_rate": 5e-4},
        training_file=training_file,
        notes="from the template",
        tags=["production"],
    )
    client, _ = signed_in(Role.ENGINEER)
    html = html_of(client.get(f"/training/new/?template={template.pk}"))
    assert re.search(r'name="preset" value="smoke"\s+checked', html)
    assert "from the template" in html and 'value="production"' in html
    assert '<details class="advanced" open>' in html and 'value="0.0005"' in html
    assert html_of(client.get("/training/new/?template=999999"))  # unknown: plain form
    assert html_of(client.get("/training/new/?from_job=not-a-uuid"))


def test_admins_may_give_a_budget_override_reason(training_file, monkeypatch, no_launch):
    seen = []
    monkeypatch.setattr(
        "training.services.hooks.before_start",
        lambda *, job, user, override_reason="": seen.append(override_reason),
    )
    engineer, _ = signed_in(Role.ENGINEER)
    review = html_of(engineer.post("/training/new/", form_data(training_file, action="review")))
    assert "Budget override reason" not in review
    admin, _ = signed_in(Role.ADMIN)
    review = html_of(admin.post("/training/new/", form_data(training_file, action="review")))
    assert "Budget override reason" in review
    data = form_data(training_file, action="start", override_reason=" client deadline ")
    assert admin.post("/training/new/", data).status_code == 302
    assert seen == ["client deadline"]


def test_without_training_files_the_form_says_where_to_get_one(db):
    client, _ = signed_in(Role.ENGINEER)
    html = html_of(client.get("/training/new/"))
    assert "No training files yet" in html and 'href="/datasets/"' in html
    assert "Choose a training file to see the duration and cost." in html


def test_without_billings_figures_the_form_and_job_page_still_work(
    training_file, monkeypatch, no_launch
):
    """Training looks billing's figures up (training/hooks.py's Pricing); with none registered
    the pages show no costs and only the default GPU type, and a job still starts."""
    from training import hooks

    monkeypatch.setattr(hooks, "_pricing", None)
    client, _ = signed_in(Role.ENGINEER)
    html = html_of(client.get("/training/new/"))
    gpu_select = re.search(r'<select name="gpu_type".*?</select>', html, re.S).group(0)
    assert gpu_select.count("<option") == 1 and "Default GPU" in gpu_select
    assert 'id="preset-figures-balanced"' in html and "<strong>On advisor:</strong>" not in html
    params = {**form_data(training_file), "part": "estimate"}
    part = html_of(client.get("/training/new/", params, headers=HTMX))
    assert "Cost estimates are not available on this installation." in part
    review = html_of(client.post("/training/new/", form_data(training_file, action="review")))
    assert "Start training" in review

    response = client.post("/training/new/", form_data(training_file, action="start"))
    job = TrainingJob.objects.get()
    assert response.status_code == 302 and no_launch == [job.pk]
    page = html_of(client.get(response["Location"]))
    assert "is queued" in page and "data-cost>$" in page
