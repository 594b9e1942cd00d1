"""Small things a new user hits: compare with one job, budgets POST, shared labels/arrows."""

from __future__ import annotations

import pytest

from config.roles import Role
from tests.training.test_pages import completed_job, signed_in


@pytest.mark.django_db
def test_compare_with_one_job_asks_for_a_second(training_file, smollm, smoke):
    client, _ = signed_in(Role.VIEWER)
    job = completed_job(training_file, smollm, smoke, name="Only one")
    other = completed_job(training_file, smollm, smoke, name="Another run")
    response = client.get(f"/training/compare/?jobs={job.pk}")
    html = response.content.decode()
    assert response.status_code == 200
    assert "Pick a second job to compare with “Only one”" in html
    assert 'id="compare-error"' not in html
    # The picker keeps the first job ticked and offers the second.
    assert f'value="{job.pk}" id="pick-{job.pk}" checked' in html
    assert f'value="{other.pk}"' in html


@pytest.mark.django_db
def test_compare_with_one_unknown_job_is_still_an_error(training_file, smollm, smoke):
    client, _ = signed_in(Role.VIEWER)
    response = client.get("/training/compare/?jobs=not-a-uuid")
    assert response.status_code == 400
    assert "does not exist" in response.content.decode()


@pytest.mark.django_db
def test_budgets_page_refuses_a_post():
    client, _ = signed_in(Role.ADMIN)
    assert client.get("/budgets/").status_code == 200
    response = client.post("/budgets/", {"budget": "1"})
    assert response.status_code == 405
    assert "GET" in response["Allow"]
