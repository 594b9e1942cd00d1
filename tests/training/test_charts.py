"""The chart data endpoint: downsampling (MinMax preselection in SQL, then LTTB), live
increments, caching of finished jobs, and who may read it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from django.utils import timezone

from config.roles import Role
from tests.training.test_pages import add_metrics, count_queries, make_job, signed_in
from training import charts
from training.models import JobStatus, MetricPoint, TrainingJob

# --- LTTB itself -------------------------------------------------------------------------------


def _reference_lttb(points: list[tuple[float, float]], threshold: int) -> list[int]:
    """Steinarsson's reference algorithm, line by line, to check the numpy version against."""
    n = len(points)
    every = (n - 2) / (threshold - 2)
    a = 0
    kept = [0]
    for i in range(threshold - 2):
        avg_start = int(math.floor((i + 1) * every) + 1)
        avg_end = min(int(math.floor((i + 2) * every) + 1), n)
        avg_x = sum(p[0] for p in points[avg_start:avg_end]) / (avg_end - avg_start)
        avg_y = sum(p[1] for p in points[avg_start:avg_end]) / (avg_end - avg_start)
        start = int(math.floor(i * every) + 1)
        end = int(math.floor((i + 1) * every) + 1)
        ax, ay = points[a]
        best, best_area = start, -1.0
        for j in range(start, end):
            area = abs((ax - avg_x) * (points[j][1] - ay) - (ax - points[j][0]) * (avg_y - ay))
            if area > best_area:
                best, best_area = j, area
        kept.append(best)
        a = best
    kept.append(n - 1)
    return kept


def test_lttb_matches_the_reference_algorithm():
    rng = np.random.default_rng(7)
    x = np.arange(1, 1001, dtype=float)
    y = np.exp(-x / 300) + rng.normal(0, 0.05, len(x))
    y[437] = 3.0  # a spike LTTB must keep
    kept = charts.lttb(x, y, 100)
    assert len(kept) == 100 and kept[0] == 0 and kept[-1] == 999
    assert list(np.diff(kept) > 0).count(False) == 0  # strictly increasing
    assert 437 in kept
    # Same picks as the reference wherever the bucket edges agree (they do for these sizes).
    reference = _reference_lttb(list(zip(x.tolist(), y.tolist(), strict=True)), 100)
    agree = sum(1 for a, b in zip(kept.tolist(), reference, strict=True) if a == b)
    assert agree >= 95, agree


def test_lttb_keeps_short_series_whole():
    x = np.arange(5, dtype=float)
    assert charts.lttb(x, x * 2, 10).tolist() == [0, 1, 2, 3, 4]


# --- The endpoint --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_short_history_is_returned_whole(training_file, smollm, smoke):
    job = make_job(training_file, smollm, smoke, name="Short", status=JobStatus.TRAINING)
    add_metrics(job, 60)
    client, _ = signed_in(Role.VIEWER)
    data = client.get(f"/training/{job.pk}/chart/").json()
    assert data["downsampled"] is False and data["points_logged"] == 60
    assert [p[0] for p in data["train"]] == list(range(1, 61))
    assert len(data["val"]) == 6 and len(data["lr"]) == 60
    assert data["active"] is True and data["status"] == "training"


@pytest.mark.django_db
def test_long_history_is_downsampled_keeping_evaluations_ends_and_spikes(
    training_file, smollm, smoke
):
    job = make_job(training_file, smollm, smoke, name="Long", status=JobStatus.TRAINING)
    add_metrics(job, 20_000, val_every=1000)
    MetricPoint.objects.filter(job=job, step=12_345).update(train_loss=9.5)  # a spike
    client, _ = signed_in(Role.VIEWER)
    data = client.get(f"/training/{job.pk}/chart/?points=500").json()
    assert data["downsampled"] is True and data["points_logged"] == 20_000
    assert 400 <= len(data["train"]) <= 500
    assert data["train"][0][0] == 1 and data["train"][-1][0] == 20_000
    assert max(p[1] for p in data["train"]) == 9.5  # the spike survives
    assert len(data["val"]) == 20  # every evaluation
    assert data["last_step"] == 20_000
    steps = [p[0] for p in data["train"]]
    assert steps == sorted(steps)


@pytest.mark.django_db
def test_live_increments_return_only_new_steps(training_file, smollm, smoke):
    job = make_job(training_file, smollm, smoke, name="Live", status=JobStatus.TRAINING)
    add_metrics(job, 100, until=40)
    client, _ = signed_in(Role.VIEWER)
    data = client.get(f"/training/{job.pk}/chart/?after=35").json()
    assert [p[0] for p in data["train"]] == [36, 37, 38, 39, 40]
    assert data["last_step"] == 40 and data["reload"] is False
    nothing = client.get(f"/training/{job.pk}/chart/?after=40").json()
    assert nothing["train"] == [] and nothing["last_step"] == 40


@pytest.mark.django_db
def test_a_finished_jobs_chart_is_cached(
    training_file, smollm, smoke, settings, django_assert_num_queries
):
    job = make_job(
        training_file,
        smollm,
        smoke,
        name="Done",
        status=JobStatus.COMPLETED,
        completed_at=timezone.now(),
    )
    add_metrics(job, 50)
    job = TrainingJob.objects.get(pk=job.pk)
    # First and last step (index seeks), and the cache read when the cache is the database.
    expected = 2 + ("DatabaseCache" in settings.CACHES["default"]["BACKEND"])
    first = charts.chart_series(job)
    with django_assert_num_queries(expected):
        second = charts.chart_series(job)
    assert first == second and len(second["train"]) == 50
    # A running job's series is cached until its next step.
    running = make_job(training_file, smollm, smoke, name="Running", status=JobStatus.TRAINING)
    add_metrics(running, 50, until=20)
    running = TrainingJob.objects.get(pk=running.pk)
    assert len(charts.chart_series(running)["train"]) == 20
    with django_assert_num_queries(expected):
        charts.chart_series(running)
    MetricPoint.objects.create(job=running, step=21, train_loss=1.0)
    assert len(charts.chart_series(running)["train"]) == 21


@pytest.mark.django_db
def test_chart_queries_do_not_grow_with_points(training_file, smollm, smoke):
    job = make_job(training_file, smollm, smoke, name="Q", status=JobStatus.TRAINING)
    client, _ = signed_in(Role.VIEWER)
    add_metrics(job, 100)
    whole = count_queries(client, f"/training/{job.pk}/chart/")
    MetricPoint.objects.filter(job=job).delete()
    add_metrics(job, 5000)
    few = count_queries(client, f"/training/{job.pk}/chart/")
    MetricPoint.objects.filter(job=job).delete()
    add_metrics(job, 20_000)
    many = count_queries(client, f"/training/{job.pk}/chart/")
    # Downsampled: one statement per 500 buckets (2,000 buckets for 1,000 points).
    assert many == few <= whole + 3, (whole, few, many)


@pytest.mark.django_db
def test_chart_endpoint_refuses_strangers_and_bad_input(training_file, smollm, smoke, client):
    job = make_job(training_file, smollm, smoke, name="Private")
    url = f"/training/{job.pk}/chart/"
    assert client.get(url).status_code == 302  # to the sign-in page
    no_role, _ = signed_in(None)
    assert no_role.get(url).status_code == 403
    viewer, _ = signed_in(Role.VIEWER)
    bad = viewer.get(f"{url}?points=lots")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_input"
    missing = viewer.get("/training/00000000-0000-0000-0000-000000000000/chart/")
    assert missing.status_code == 404
