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


def test_label_and_arrow_filters():
    from config.templatetags.crucible import arrows, label

    assert label("needs_approval") == "Needs approval"
    assert label("completed") == "Completed"
    assert label("GPU type") == "GPU type"
    assert label(None) == ""
    assert arrows("Perplexity: 24.5 -> 16.8 (31% improvement)") == (
        "Perplexity: 24.5 → 16.8 (31% improvement)"
    )
    assert arrows("a->b") == "a → b"


@pytest.mark.django_db
def test_pages_use_one_arrow_and_capitalised_status_labels(training_file, smollm, smoke):
    client, _ = signed_in(Role.VIEWER)
    a = completed_job(training_file, smollm, smoke, name="Run A")
    b = completed_job(training_file, smollm, smoke, name="Run B")
    detail = client.get(f"/training/{a.pk}/").content.decode()
    assert "→" in detail and " -&gt; " not in detail and " -> " not in detail
    compare = client.get(f"/training/compare/?jobs={a.pk}&jobs={b.pk}").content.decode()
    assert ">Completed</span>" in compare and ">completed</span>" not in compare
    budgets = client.get("/budgets/").content.decode()
    assert ">completed</span>" not in budgets


@pytest.mark.django_db
def test_preset_cards_quote_the_chosen_file(training_file):
    import io
    import re

    from corpora.services import training_file_create
    from tests.training.conftest import conversations

    bigger = training_file_create(name="bigger", upload=io.BytesIO(conversations(60)), user=None)
    client, _ = signed_in(Role.ENGINEER)

    def figures(html: str, key: str) -> str:
        match = re.search(rf'id="preset-figures-{key}"[^>]*>(.*?)</span>\n', html, re.S)
        assert match, key
        return match.group(1)

    html = client.get(f"/training/new/?training_file={training_file.pk}").content.decode()
    assert "242-conversation" not in html
    small = {k: figures(html, k) for k in ("conservative", "balanced", "aggressive", "smoke")}
    assert all("On advisor:" in text for text in small.values())
    assert "12 steps" in small["smoke"]
    assert "(2.0 epochs)" in small["conservative"] and "(4.0 epochs)" in small["aggressive"]
    # Another file in the form: the estimate's htmx refresh swaps every card's figures.
    part = client.get(
        "/training/new/",
        {"part": "estimate", "training_file": bigger.pk, "base_model": "SmolLM2-135M-Instruct",
         "preset": "balanced", "executor": "local"},
        HTTP_HX_REQUEST="true",
    ).content.decode()  # fmt: skip
    assert 'id="preset-figures-balanced" hx-swap-oob="true"' in part
    assert "On bigger:" in figures(part, "balanced")
