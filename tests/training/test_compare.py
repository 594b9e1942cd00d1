"""Compare 2-4 training jobs: the service, the JSON API (+ CSV) and the page."""

from __future__ import annotations

import csv
import io
import uuid

import pytest

from config.roles import Role
from tests.conftest import assert_envelope
from tests.training.test_pages import (
    add_metrics,
    completed_job,
    failed_oom_job,
    make_job,
    signed_in,
)
from training import services
from training.models import JobStatus, MetricPoint, TrainingJob


def _variant(job: TrainingJob, *, lora_r: int, val_loss: float, ppl: float, cost: float):
    config = {**job.configuration}
    config["hyperparameters"] = {**config["hyperparameters"], "lora_r": lora_r}
    TrainingJob.objects.filter(pk=job.pk).update(
        configuration=config, final_val_loss=val_loss, perplexity_trained=ppl, cost_actual=cost
    )
    return TrainingJob.objects.get(pk=job.pk)


@pytest.fixture
def pair(training_file, smollm, smoke):
    a = completed_job(training_file, smollm, smoke, name="Balanced r16")
    b = completed_job(training_file, smollm, smoke, name="Aggressive r32", steps=40)
    b = _variant(b, lora_r=32, val_loss=1.25, ppl=15.1, cost=0.91)
    return a, b


def _metric(comparison: dict, key: str) -> dict:
    return next(m for m in comparison["metrics"] if m["key"] == key)


# --- Service ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_compare_marks_the_best_of_each_metric(pair):
    a, b = pair
    comparison = services.training_jobs_compare(job_ids=[a.pk, b.pk])
    assert [j["name"] for j in comparison["jobs"]] == ["Balanced r16", "Aggressive r32"]
    # Lower validation loss and perplexity win; the cheaper job wins on cost.
    assert _metric(comparison, "final_val_loss")["values"] == [1.3391, 1.25]
    assert _metric(comparison, "final_val_loss")["best"] == [False, True]
    assert _metric(comparison, "perplexity_trained")["best"] == [False, True]
    assert _metric(comparison, "perplexity_improvement_pct")["best"] == [False, True]
    assert _metric(comparison, "cost")["best"] == [True, False]
    # Same value in both: no winner. "Before" is not a contest at all.
    assert _metric(comparison, "final_train_loss")["best"] == [False, False]
    assert _metric(comparison, "perplexity_baseline")["best"] == [False, False]
    lora_r = next(h for h in comparison["hyperparameters"] if h["key"] == "lora_r")
    assert lora_r == {
        "key": "lora_r",
        "values": [a.configuration["hyperparameters"]["lora_r"], 32],
        "differs": True,
    }
    assert not next(h for h in comparison["hyperparameters"] if h["key"] == "seed")["differs"]
    # Loss series for the overlaid chart: every logged step, validation where evaluated.
    assert len(comparison["jobs"][0]["train_loss"]) == 60
    assert len(comparison["jobs"][1]["train_loss"]) == 40
    assert comparison["jobs"][0]["val_loss"][0][0] == 10


@pytest.mark.django_db
def test_compare_thins_long_curves_but_keeps_the_last_point(training_file, smollm, smoke):
    a = completed_job(training_file, smollm, smoke, name="long")
    MetricPoint.objects.filter(job=a).delete()
    add_metrics(a, 2500, val_every=100)
    b = make_job(training_file, smollm, smoke, name="empty")
    comparison = services.training_jobs_compare(job_ids=[a.pk, b.pk])
    train = comparison["jobs"][0]["train_loss"]
    assert len(train) <= services.COMPARE_MAX_POINTS
    assert train[-1][0] == 2500
    assert len(comparison["jobs"][0]["val_loss"]) == 25
    assert comparison["jobs"][1]["train_loss"] == []


# --- API -------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_compare_api_for_a_viewer(pair, api_as):
    a, b = pair
    response = api_as(Role.VIEWER).get(f"training/compare?jobs={a.pk}&jobs={b.pk}")
    assert response.status_code == 200, response.content
    body = response.json()
    assert [j["id"] for j in body["jobs"]] == [str(a.pk), str(b.pk)]
    assert {m["key"] for m in body["metrics"]} >= {"final_val_loss", "cost", "duration_seconds"}


@pytest.mark.django_db
def test_compare_csv(pair, api_as):
    a, b = pair
    response = api_as(Role.VIEWER).get(f"training/compare/csv?jobs={a.pk}&jobs={b.pk}")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(response.content.decode())))
    assert rows[0] == ["field", "Balanced r16", "Aggressive r32", "best"]
    by_field = {r[0]: r for r in rows}
    assert by_field["final_val_loss"] == ["final_val_loss", "1.3391", "1.25", "Aggressive r32"]
    assert by_field["cost"][3] == "Balanced r16"
    assert by_field["lora_r"][2] == "32"
    assert by_field["target_modules"][1].startswith('["q_proj"')


@pytest.mark.django_db
@pytest.mark.parametrize("count", [0, 1, 5])
def test_compare_needs_two_to_four_jobs(training_file, smollm, smoke, api_as, count):
    jobs = [make_job(training_file, smollm, smoke, name=f"j{i}") for i in range(count)]
    query = "&".join(f"jobs={j.pk}" for j in jobs) or "jobs="
    response = api_as(Role.VIEWER).get(f"training/compare?{query}")
    assert response.status_code in (400, 422)
    error = response.json()["error"]
    assert error["message"]


@pytest.mark.django_db
def test_compare_unknown_job_is_named(pair, api_as):
    a, _ = pair
    missing = uuid.uuid4()
    response = api_as(Role.VIEWER).get(f"training/compare?jobs={a.pk}&jobs={missing}")
    error = assert_envelope(response, 422, "validation_error")
    assert str(missing) in error["message"]
    assert error["details"]["missing"] == [str(missing)]


@pytest.mark.django_db
def test_compare_api_needs_a_sign_in(pair, anon_api):
    a, b = pair
    for path in ("training/compare", "training/compare/csv"):
        assert_envelope(anon_api.get(f"{path}?jobs={a.pk}&jobs={b.pk}"), 401)


# --- Page ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_compare_page_side_by_side(pair):
    a, b = pair
    client, _ = signed_in(Role.VIEWER)
    response = client.get(f"/training/compare/?jobs={a.pk}&jobs={b.pk}")
    assert response.status_code == 200
    html = response.content.decode()
    assert "Balanced r16" in html and "Aggressive r32" in html
    assert 'id="compare-chart"' in html and 'id="compare-chart-data"' in html
    assert f"/api/v1/training/compare/csv?jobs={a.pk}&amp;jobs={b.pk}" in html
    # The best validation loss is marked (and says so to screen readers).
    assert (
        '<td class="num is-best"><span class="icon icon-check-circle" aria-hidden="true"></span><span class="sr-only">Best: </span>1.2500</td>'
        in html
    )
    assert 'class="is-different"' in html and "<code>lora_r</code>" in html
    # The picker keeps the selection.
    assert html.count("checked") >= 2
    assert 'aria-current="page"><span class="nav-text">Compare' in html


@pytest.mark.django_db
def test_compare_page_states(training_file, smollm, smoke):
    client, _ = signed_in(Role.VIEWER)
    # Empty: nothing completed yet.
    html = client.get("/training/compare/").content.decode()
    assert "Nothing to compare yet" in html
    job = completed_job(training_file, smollm, smoke, name="Only one")
    # The picker lists finished jobs (a failed run's curve is worth comparing), not live ones.
    failed = failed_oom_job(training_file, smollm, smoke)
    running = make_job(training_file, smollm, smoke, name="live", status=JobStatus.TRAINING)
    html = client.get("/training/compare/").content.decode()
    assert f'value="{job.pk}"' in html and "Compare selected" in html
    assert f'value="{failed.pk}"' in html and f'value="{running.pk}"' not in html
    # One job is half a selection: a page asking for a second job (see test_small_fixes).
    response = client.get(f"/training/compare/?jobs={job.pk}")
    assert response.status_code == 200
    assert "Pick a second job" in response.content.decode()
    # Unknown and malformed ids are named, not a crash.
    response = client.get(f"/training/compare/?jobs={job.pk}&jobs={uuid.uuid4()}")
    assert response.status_code == 400 and "No training job" in response.content.decode()
    response = client.get(f"/training/compare/?jobs={job.pk}&jobs=nope")
    assert response.status_code == 400 and "not valid" in response.content.decode()


@pytest.mark.django_db
def test_compare_page_needs_a_role(pair):
    a, b = pair
    client, _ = signed_in(role=None)
    assert client.get(f"/training/compare/?jobs={a.pk}&jobs={b.pk}").status_code == 403


@pytest.mark.django_db
def test_compare_queries_do_not_grow_with_jobs_and_points(
    training_file, smollm, smoke, django_assert_max_num_queries
):
    client, _ = signed_in(Role.VIEWER)
    two = [completed_job(training_file, smollm, smoke, name=f"a{i}", steps=20) for i in range(2)]
    url = "/training/compare/?" + "&".join(f"jobs={j.pk}" for j in two)
    with django_assert_max_num_queries(8):
        assert client.get(url).status_code == 200
    four = [completed_job(training_file, smollm, smoke, name=f"b{i}", steps=300) for i in range(4)]
    for i in range(20):
        make_job(training_file, smollm, smoke, name=f"filler {i}", status=JobStatus.COMPLETED)
    url = "/training/compare/?" + "&".join(f"jobs={j.pk}" for j in four)
    with django_assert_max_num_queries(8):
        assert client.get(url).status_code == 200
