"""More of the training dashboard: the list's filters and sorting, selection for Compare,
the detail page's cost line, notes and tags, and its actions per role."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from config.roles import Role
from tests.factories import UserFactory
from tests.training.test_pages import (
    HTMX,
    count_queries,
    failed_oom_job,
    html_of,
    make_job,
    seed_jobs,
    signed_in,
)
from training.models import JobStatus, TrainingJob

pytestmark = pytest.mark.django_db
S = JobStatus


def names(client, query: str) -> list[str]:
    html = html_of(client.get(f"/training/?{query}"))
    return re.findall(r'class="job-name" href="[^"]+" title="([^"]+)"', html)


@pytest.fixture
def spread(training_file, smollm, smoke):
    """Jobs by two people with different tags, costs, ages and durations."""
    grace = UserFactory(role=Role.ENGINEER, username="grace")
    alan = UserFactory(role=Role.ENGINEER, username="alan")
    now = timezone.now()
    rows = [
        ("Cheap quick", grace, ["experiment"], "1.50", 2, 10),
        ("Mid production", alan, ["production", "client:acme"], "42.00", 5, 300),
        ("Costly long", grace, ["production"], "120.00", 40, 900),
    ]
    jobs = {}
    for name, user, tags, cost, days_ago, minutes in rows:
        job = make_job(
            training_file,
            smollm,
            smoke,
            name=name,
            user=user,
            tags=tags,
            status=S.COMPLETED,
            cost_actual=Decimal(cost),
            cost_estimate=Decimal("30.00"),
            started_at=now - timedelta(days=days_ago),
            completed_at=now - timedelta(days=days_ago) + timedelta(minutes=minutes),
        )
        TrainingJob.objects.filter(pk=job.pk).update(created_at=now - timedelta(days=days_ago))
        jobs[name] = job
    return jobs


def test_filters_by_creator_tag_dates_and_cost(spread):
    client, _ = signed_in()
    assert names(client, "creator=grace") == ["Cheap quick", "Costly long"]
    assert names(client, "tag=production") == ["Mid production", "Costly long"]
    assert names(client, "tag=client:acme") == ["Mid production"]
    assert names(client, "tag=prod") == []  # whole tags only
    day = (timezone.now() - timedelta(days=10)).date().isoformat()
    assert names(client, f"from={day}") == ["Cheap quick", "Mid production"]
    assert names(client, f"to={day}") == ["Costly long"]
    assert names(client, "cost_min=10&cost_max=$100") == ["Mid production"]
    html = html_of(client.get("/training/?creator=grace"))
    assert '<option value="grace" selected>' in html and 'id="filters-more"' in html
    assert 'id="filters-more" hidden' not in html  # open when one of its filters is set


def test_sorting_by_cost_duration_and_name_with_header_links(spread):
    client, _ = signed_in()
    assert names(client, "sort=-cost") == ["Costly long", "Mid production", "Cheap quick"]
    assert names(client, "sort=cost") == ["Cheap quick", "Mid production", "Costly long"]
    assert names(client, "sort=-duration") == ["Costly long", "Mid production", "Cheap quick"]
    assert names(client, "sort=name") == ["Cheap quick", "Costly long", "Mid production"]
    assert names(client, "sort=bogus")[0] == "Cheap quick"  # newest first
    html = html_of(client.get("/training/?sort=-cost&tag=production"))
    assert 'aria-sort="descending"><a class="sort is-active" href="?sort=cost&amp;tag=' in html
    assert 'aria-sort="none"><a class="sort" href="?sort=-duration&amp;tag=production"' in html


def test_bad_filter_values_are_ignored_and_reported(spread):
    client, _ = signed_in()
    response = client.get("/training/?from=yesterday&cost_min=lots&to=2026-13-45")
    html = html_of(response)
    assert "Some filters were ignored." in html
    assert "From date must be a date" in html and "Minimum cost must be an amount" in html
    assert "To date must be a date" in html
    assert len(re.findall(r'class="job-name"', html)) == 3


def test_compare_selection_and_cost_column(spread):
    client, _ = signed_in()
    html = html_of(client.get("/training/"))
    assert 'action="/training/compare/"' in html and 'id="compare-button" disabled' in html
    assert html.count('class="compare-check"') == 3
    job = spread["Costly long"]
    assert f'name="jobs" value="{job.pk}" form="compare-form"' in html
    assert '<span class="cost-over" title="Over the estimate">$120.00</span>' in html
    assert "est. $30.00" in html


def test_new_job_button_only_for_those_who_may_run_jobs(spread):
    viewer, _ = signed_in(Role.VIEWER)
    engineer, _ = signed_in(Role.ENGINEER)
    assert 'id="new-job"' not in html_of(viewer.get("/training/"))
    assert 'id="new-job"' in html_of(engineer.get("/training/"))


def test_list_with_filters_keeps_a_flat_query_count(spread, training_file, smollm, smoke):
    client, _ = signed_in()
    url = "/training/?tag=production&sort=-duration&cost_min=1&from=2020-01-01"
    few = count_queries(client, url)
    for i in range(15):
        make_job(
            training_file,
            smollm,
            smoke,
            name=f"More {i}",
            user=UserFactory(role=Role.ENGINEER),
            tags=["production"],
            status=S.COMPLETED,
            cost_actual=Decimal("5"),
        )
    assert count_queries(client, url) == few


# --- Detail ------------------------------------------------------------------------------------


def test_cost_over_the_estimate_warns(spread):
    client, _ = signed_in()
    costly = html_of(client.get(f"/training/{spread['Costly long'].pk}/"))
    assert 'class="cost-line is-over"' in costly and "300% over the estimate." in costly
    cheap = html_of(client.get(f"/training/{spread['Cheap quick'].pk}/"))
    assert 'class="cost-line"' in cheap and "over the estimate" not in cheap
    assert "Spent <strong>$1.50</strong> of an estimated <strong>$30.00</strong>" in cheap


def test_notes_and_tags_are_editable_by_engineers_only(spread):
    job = spread["Cheap quick"]
    url = f"/training/{job.pk}/annotate/"
    viewer, _ = signed_in(Role.VIEWER)
    page = html_of(viewer.get(f"/training/{job.pk}/"))
    assert "Notes and tags" in page and url not in page
    assert viewer.post(url, {"notes": "x", "tags": "y"}).status_code == 403
    # Another engineer reads the job but changes only what they created (object permissions).
    other, _ = signed_in(Role.ENGINEER)
    assert url not in html_of(other.get(f"/training/{job.pk}/"))
    assert other.post(url, {"notes": "x", "tags": "y"}).status_code == 403
    engineer, owner = signed_in(Role.ENGINEER)
    TrainingJob.objects.filter(pk=job.pk).update(created_by=owner)
    assert url in html_of(engineer.get(f"/training/{job.pk}/"))
    response = engineer.post(
        url, {"notes": "LR too high?", "tags": "Sweep, lr-test, sweep"}, headers=HTMX
    )
    part = html_of(response)
    assert part.lstrip().startswith('<section class="card card-flush annotations"')
    assert "Saved" in part and 'value="lr-test, sweep"' in part
    job.refresh_from_db()
    assert job.notes == "LR too high?" and job.tags == ["lr-test", "sweep"]
    too_many = ", ".join(f"t{i}" for i in range(21))
    bad = engineer.post(url, {"notes": "", "tags": too_many}, headers=HTMX)
    assert bad.status_code == 400 and "At most 20 tags." in bad.content.decode()
    job.refresh_from_db()
    assert job.tags == ["lr-test", "sweep"]
    plain = engineer.post(url, {"notes": "plain post", "tags": ""})
    assert plain.status_code == 302
    job.refresh_from_db()
    assert job.notes == "plain post" and job.tags == []
    assert engineer.get(url).status_code == 405


def test_actions_per_role_and_save_as_template(training_file, smollm, smoke):
    jobs = seed_jobs(training_file, smollm, smoke)
    completed = jobs["completed"]
    engineer, _ = signed_in(Role.ENGINEER)
    html = html_of(engineer.get(f"/training/{completed.pk}/"))
    assert f'action="/training/{completed.pk}/save-template/"' in html
    assert f"/training/new/?from_job={completed.pk}" in html
    viewer, _ = signed_in(Role.VIEWER)
    html = html_of(viewer.get(f"/training/{completed.pk}/"))
    assert "save-template" not in html and "from_job" not in html and "hx-post" not in html


def test_provisioning_errors_offer_switch_to_on_demand(training_file, smollm, smoke):
    job = failed_oom_job(training_file, smollm, smoke)
    TrainingJob.objects.filter(pk=job.pk).update(
        error_type="GPUProvisioningError", spot=True, executor="runpod"
    )
    engineer, _ = signed_in(Role.ENGINEER)
    html = html_of(engineer.get(f"/training/{job.pk}/"))
    assert f'hx-post="/api/v1/training/jobs/{job.pk}/switch-to-on-demand"' in html
    assert "Switch to on-demand" in html
    viewer, _ = signed_in(Role.VIEWER)
    assert "switch-to-on-demand" not in html_of(viewer.get(f"/training/{job.pk}/"))
    other = failed_oom_job(training_file, smollm, smoke, name="Plain OOM")
    assert "switch-to-on-demand" not in html_of(engineer.get(f"/training/{other.pk}/"))
