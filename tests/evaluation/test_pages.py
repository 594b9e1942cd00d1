"""Validation pages: index, dashboard, blind rating page; roles decide the buttons and the
server refuses what the role may not do."""
# ruff: noqa: F811  (fixtures imported from core_fixtures are redefined as arguments)

import re

import pytest
from django.urls import reverse
from django.utils.html import escape

from config.roles import Role
from config.templatetags.crucible import arrows  # pages show one arrow style (→)
from evaluation.models import HumanRating, RatingPair, RunStatus, ValidationRun
from tests.evaluation.core_fixtures import (  # noqa: F401
    REVEALING,
    completed_job,
    completed_run,
    fake_pdf,
    fake_scoring,
    fast_settings,
    make_completed_job,
    on_commit_now,
)
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def login(client, role):
    user = UserFactory(role=role)
    client.force_login(user)
    return user


def test_index_lists_runs_and_jobs_waiting_for_validation(
    client, completed_run, django_assert_max_num_queries
):
    login(client, Role.ENGINEER)
    waiting = make_completed_job(name="Waiting job")
    response = client.get(reverse("evaluation:index"))
    html = response.content.decode()
    assert response.status_code == 200
    assert f'data-run="{completed_run.pk}"' in html
    assert f'data-ready-job="{waiting.pk}"' in html and 'data-action="validate"' in html
    # Filters.
    html = client.get(reverse("evaluation:index") + "?status=failed").content.decode()
    assert f'data-run="{completed_run.pk}"' not in html and "No validations match" in html
    # No query per row.
    with django_assert_max_num_queries(30) as first:
        client.get(reverse("evaluation:index"))
    for n in range(4):
        ValidationRun.objects.create(job=make_completed_job(name=f"More {n}"))
    with django_assert_max_num_queries(len(first.captured_queries)):
        client.get(reverse("evaluation:index"))


def test_viewers_get_no_validate_button_and_a_403(client, completed_job):
    login(client, Role.VIEWER)
    html = client.get(reverse("evaluation:index")).content.decode()
    assert 'data-action="validate"' not in html
    response = client.post(reverse("evaluation:job_validate", args=[completed_job.pk]))
    assert response.status_code == 403
    assert not ValidationRun.objects.exists()


def test_an_engineer_starts_a_validation_from_the_page(
    client, completed_job, fake_scoring, fake_pdf, on_commit_now
):
    login(client, Role.ENGINEER)
    response = client.post(reverse("evaluation:job_validate", args=[completed_job.pk]))
    run = ValidationRun.objects.get(job=completed_job)
    assert response.status_code == 302 and response["Location"] == reverse(
        "evaluation:run", args=[run.pk]
    )
    assert run.status == RunStatus.COMPLETED


def test_the_dashboard_shows_the_stored_figures(client, completed_run):
    login(client, Role.ANALYST)
    html = client.get(reverse("evaluation:run", args=[completed_run.pk])).content.decode()
    metrics = completed_run.metrics
    for part in ("perplexity", "retention", "emotional_intelligence"):
        assert escape(arrows(metrics[part]["display"])) in html, part
        assert f'data-metric="{part}"' in html
    assert 'data-metric="brand_voice"' in html
    assert "95% CI" in html
    assert html.count('class="example"') == 10
    for button in ("approve", "reject", "regenerate", "share", "rate", "download-report"):
        assert f'data-action="{button}"' in html, button


def test_a_viewer_sees_the_dashboard_without_buttons(client, completed_run):
    login(client, Role.VIEWER)
    html = client.get(reverse("evaluation:run", args=[completed_run.pk])).content.decode()
    assert escape(arrows(completed_run.metrics["perplexity"]["display"])) in html
    for button in ("approve", "reject", "regenerate", "share", "rate", "revoke"):
        assert f'data-action="{button}"' not in html, button
    assert client.get(reverse("evaluation:rate", args=[completed_run.pk])).status_code == 403
    regenerate = client.post(reverse("evaluation:report_generate", args=[completed_run.pk]))
    assert regenerate.status_code == 403
    assert completed_run.reports.count() == 1


def test_a_running_validation_polls_its_status(client, completed_job):
    login(client, Role.VIEWER)
    run = ValidationRun.objects.create(
        job=completed_job, status=RunStatus.RUNNING, stage="generating", progress=42
    )
    html = client.get(reverse("evaluation:run", args=[run.pk])).content.decode()
    assert 'id="run-status"' in html and "42%" in html and "Generating" in html
    part = client.get(
        reverse("evaluation:run", args=[run.pk]) + "?part=status", headers={"HX-Request": "true"}
    )
    assert part.status_code == 200 and part.content.decode().lstrip().startswith("<section")
    ValidationRun.objects.filter(pk=run.pk).update(status=RunStatus.COMPLETED)
    done = client.get(
        reverse("evaluation:run", args=[run.pk]) + "?part=status", headers={"HX-Request": "true"}
    )
    assert done.status_code == 204 and done["HX-Refresh"] == "true"


def _radio_names(html: str) -> set[str]:
    return set(re.findall(r'type="radio" name="([^"]+)"', html))


def test_the_blind_page_never_reveals_the_sides(client, completed_run):
    login(client, Role.ANALYST)
    url = reverse("evaluation:rate", args=[completed_run.pk])
    for _ in range(6):  # several items, both suites
        for suite in ("emotional_intelligence", "brand_voice"):
            response = client.get(f"{url}?suite={suite}")
            html = response.content.decode()
            assert response.status_code == 200
            lowered = html.lower()
            for word in REVEALING:
                assert word not in lowered, f"{word!r} in the blind page"
            assert "Response A" in html and "Response B" in html
            pair = RatingPair.objects.filter(rater__isnull=False, rating__isnull=True).get(
                suite=suite
            )
            assert pair.left_side not in html and str(pair.pk) in html  # opaque item id only
            names = _radio_names(html)
            data = {name: "3" for name in names}
            data.update(item=str(pair.pk), suite=suite)
            assert client.post(url, data).status_code == 302
    assert HumanRating.objects.count() == 12


def test_rating_on_the_page_maps_back_to_the_sides(client, completed_run):
    analyst = login(client, Role.ANALYST)
    url = reverse("evaluation:rate", args=[completed_run.pk])
    client.get(url + "?suite=emotional_intelligence")
    pair = RatingPair.objects.get(rater=analyst)
    data = {"item": str(pair.pk), "suite": "emotional_intelligence", "comment": "A is curt"}
    for key in ("empathy", "clarity", "appropriateness"):
        data[f"a__{key}"] = "1"
        data[f"b__{key}"] = "5"
    response = client.post(url, data, headers={"HX-Request": "true"})
    assert response.status_code == 200 and 'id="rating-card"' in response.content.decode()
    rating = HumanRating.objects.get()
    left_is_base = pair.left_side == "baseline"
    assert rating.baseline_scores["empathy"] == (1 if left_is_base else 5)
    assert rating.trained_scores["empathy"] == (5 if left_is_base else 1)
    assert rating.comment == "A is curt"


def test_an_incomplete_rating_is_shown_again_with_the_problem(client, completed_run):
    analyst = login(client, Role.ANALYST)
    url = reverse("evaluation:rate", args=[completed_run.pk])
    client.get(url + "?suite=emotional_intelligence")
    pair = RatingPair.objects.get(rater=analyst)
    response = client.post(
        url,
        {"item": str(pair.pk), "suite": "emotional_intelligence", "a__empathy": "4"},
        headers={"HX-Request": "true"},
    )
    html = response.content.decode()
    assert "every criterion needs a score" in html
    assert f'value="{pair.pk}"' in html  # the same item again
    assert 'name="a__empathy" value="4" required checked' in html
    assert not HumanRating.objects.exists()


def test_the_rating_page_says_when_everything_is_rated(client, completed_run, monkeypatch):
    login(client, Role.ANALYST)
    monkeypatch.setattr("evaluation.services.rating_pair_next", lambda **kw: None)
    html = client.get(reverse("evaluation:rate", args=[completed_run.pk])).content.decode()
    assert "All done" in html


def test_report_download_from_the_dashboard(client, completed_run):
    login(client, Role.VIEWER)
    report = completed_run.reports.get()
    from tests.conftest import fetch_download

    pdf = fetch_download(client.get(reverse("evaluation:report_download", args=[report.pk])))
    assert pdf.startswith(b"%PDF")


def test_regenerating_from_the_dashboard_refreshes_the_page(client, completed_run):
    login(client, Role.ANALYST)
    response = client.post(
        reverse("evaluation:report_generate", args=[completed_run.pk]),
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 204 and response["HX-Refresh"] == "true"
    assert completed_run.reports.count() == 2


def test_anonymous_users_are_sent_to_sign_in(client, completed_run):
    for url in (
        reverse("evaluation:index"),
        reverse("evaluation:run", args=[completed_run.pk]),
        reverse("evaluation:rate", args=[completed_run.pk]),
    ):
        response = client.get(url)
        assert response.status_code == 302 and "/login/" in response["Location"]


def test_the_job_card_partial_links_the_validation(rf, completed_run):
    from django.template import Context, Template

    request = rf.get("/")
    request.user = UserFactory(role=Role.VIEWER)
    html = Template("{% load evaluation_tags %}{% validation_card job %}").render(
        Context({"request": request, "job": completed_run.job})
    )
    assert reverse("evaluation:run", args=[completed_run.pk]) in html
    assert "download/validation-report" in html
    assert escape(completed_run.metrics["perplexity"]["display"]) in html


def test_a_smoke_run_reads_as_a_plumbing_check_not_a_quality_claim(client, completed_run):
    """The demo's validation (a Smoke job) says what it is; a real preset's does not."""
    from training.models import Preset, TrainingJob

    login(client, Role.VIEWER)
    url = reverse("evaluation:run", args=[completed_run.pk])
    assert completed_run.job.preset.key == "smoke"
    html = client.get(url).content.decode()
    assert 'id="smoke-note"' in html and "plumbing check, not a quality claim" in html
    assert html.index('id="smoke-note"') < html.index('class="metric-cards"')
    assert " -&gt; " not in html  # one arrow style
    TrainingJob.objects.filter(pk=completed_run.job_id).update(
        preset=Preset.objects.get(key="balanced")
    )
    assert 'id="smoke-note"' not in client.get(url).content.decode()
