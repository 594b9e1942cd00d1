"""Estimates: the range holds the actual figures of jobs like those in the history."""

import json
import time
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing import services
from billing.estimates import range_text
from billing.models import GpuPrice, JobCost
from config.roles import Role
from tests.billing.conftest import make_job
from tests.conftest import assert_envelope
from training.models import JobStatus

S = JobStatus
PHASES = {"provisioning": 2.0, "preprocessing": 6.0, "model_loading": 12.0, "finalization": 40.0}


def true_training_seconds(steps):
    """The 'machine': 1.1 s per optimizer step of a Smoke job on this CPU."""
    return 1.1 * steps


def completed_smoke(training_file, smollm, smoke, *, steps, jitter, name="hist"):
    """A local Smoke job that ran ``steps`` steps, its training time off by ``jitter``."""
    training = true_training_seconds(steps) * (1 + jitter)
    t = 0.0
    stages = [(S.QUEUED, -5), (S.PROVISIONING, 0)]
    t += PHASES["provisioning"]
    stages.append((S.PREPROCESSING, t))
    t += PHASES["preprocessing"]
    stages.append((S.MODEL_LOADING, t))
    t += PHASES["model_loading"]
    stages.append((S.TRAINING, t))
    t += training
    stages.append((S.FINALIZATION, t))
    t += PHASES["finalization"]
    stages.append((S.COMPLETED, t))
    job = make_job(
        training_file=training_file,
        base_model=smollm,
        preset=smoke,
        executor="local",
        gpu_type="",
        overrides={"max_steps": steps},
        status=S.COMPLETED,
        stages=stages,
        current_step=steps,
        total_steps=steps,
        rate=1,
        name=f"{name}-{steps}",
    )
    last = job.transitions.order_by("-at").first()
    type(job).objects.filter(pk=job.pk).update(completed_at=last.at)
    return t  # held seconds


@pytest.fixture
def notional_local_rate(db):
    GpuPrice.objects.filter(gpu_type="cpu-local").update(
        spot_per_hour=Decimal("1.00"), on_demand_per_hour=Decimal("1.00")
    )


def test_catalog_is_seeded_with_the_seed_prices(db):
    h100 = GpuPrice.objects.get(gpu_type="h100-pcie-80gb")
    assert (h100.spot_per_hour, h100.on_demand_per_hour) == (Decimal("2.49"), Decimal("7.99"))
    local = GpuPrice.objects.get(gpu_type="cpu-local")
    assert local.spot_per_hour == local.on_demand_per_hour == 0


def test_prior_estimate_gives_ranges_for_spot_and_on_demand(training_file, smollm, smoke):
    est = services.cost_estimate(
        training_file=training_file,
        base_model=smollm,
        preset=smoke,
        gpu_type="h100-pcie-80gb",
        spot=True,
    )
    assert est.basis == "prior" and est.history_jobs == 0
    assert est.steps == 12  # the Smoke preset's max_steps
    d = est.duration_seconds
    assert d["low"] < d["point"] < d["high"]
    assert est.cost_spot["point"] < est.cost_on_demand["point"]
    assert "(spot)" in est.text and "(on-demand)" in est.text
    assert est.text.startswith("Estimated duration: ")


def test_range_text_reads_like_the_seed():
    assert range_text(12 * 3600, 15 * 3600) == "12-15 hours"
    assert range_text(200, 400) == "3.3-6.7 minutes"
    assert range_text(30, 90) == "30-90 seconds"


def test_spot_adds_expected_recovery_overhead(training_file, smollm):
    from training.models import Preset

    balanced = Preset.objects.get(key="balanced")
    llama = type(smollm).objects.get(name="meta-llama/Meta-Llama-3-70B-Instruct")
    kwargs = dict(training_file=training_file, base_model=llama, preset=balanced)
    spot = services.cost_estimate(**kwargs, spot=True)
    demand = services.cost_estimate(**kwargs, spot=False)
    assert spot.duration_seconds["high"] > demand.duration_seconds["high"]
    assert spot.recovery_seconds["seconds_per_interruption"] > 0


def test_more_epochs_cost_more(training_file, smollm, smoke):
    one = services.cost_estimate(
        training_file=training_file,
        base_model=smollm,
        preset=smoke,
        overrides={"max_steps": None, "num_epochs": 1},
        gpu_type="h100-pcie-80gb",
    )
    four = services.cost_estimate(
        training_file=training_file,
        base_model=smollm,
        preset=smoke,
        overrides={"max_steps": None, "num_epochs": 4},
        gpu_type="h100-pcie-80gb",
    )
    assert four.steps == 4 * one.steps
    assert four.training_seconds > one.training_seconds


def test_range_contains_actual_figures_of_smoke_jobs_like_the_history(
    training_file, smollm, smoke, notional_local_rate
):
    """Six completed local Smoke jobs of different sizes on a machine whose shape differs
    from the prior's (a long finalization): the fit learns it, and the next job's actual
    duration and cost fall inside the estimated range, which is within +-15%."""
    sizes = [(12, -0.03), (24, 0.02), (36, -0.01), (48, 0.04), (60, 0.0), (72, -0.02)]
    for steps, jitter in sizes:
        completed_smoke(training_file, smollm, smoke, steps=steps, jitter=jitter)
    est = services.cost_estimate(
        training_file=training_file,
        base_model=smollm,
        preset=smoke,
        overrides={"max_steps": 30},
        executor="local",
    )
    assert est.basis == "history" and est.history_jobs == 6
    assert est.spread <= 0.15
    for jitter in (-0.04, 0.0, 0.03):
        actual_s = sum(PHASES.values()) + true_training_seconds(30) * (1 + jitter)
        d = est.duration_seconds
        assert d["low"] <= actual_s <= d["high"], (jitter, d, actual_s)
        actual_cost = actual_s / 3600  # $1/h notional local rate
        assert est.cost["low"] <= actual_cost <= est.cost["high"]
        assert abs(d["point"] / actual_s - 1) <= 0.15


def test_job_creation_stores_the_estimate(training_file, smollm, smoke, fake_executor):
    from training.services import training_job_create

    job = training_job_create(
        user=None,
        training_file=training_file,
        base_model=smollm,
        name="x",
        preset=smoke,
        gpu_type="h100-pcie-80gb",
        spot=True,
        executor="runpod",
    )
    assert job.cost_estimate is not None and job.cost_estimate >= 0
    cost = JobCost.objects.get(job=job)
    assert cost.rate_per_hour == Decimal("2.49")
    assert cost.estimate["text"]


# --- API ---------------------------------------------------------------------------------


def test_cost_estimate_endpoint_answers_fast(api_as, training_file, smollm, smoke):
    for steps in (12, 24, 36):
        completed_smoke(training_file, smollm, smoke, steps=steps, jitter=0.0)
    client = api_as(Role.VIEWER)
    url = (
        f"training/cost-estimate?training_file_id={training_file.pk}&preset=smoke"
        f"&base_model=SmolLM2-135M-Instruct&executor=local"
        f"&overrides={json.dumps({'max_steps': 30})}"
    )
    client.get(url)  # warm
    with CaptureQueriesContext(connection) as queries:
        began = time.perf_counter()
        response = client.get(url)
        elapsed = time.perf_counter() - began
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["basis"] == "history" and body["steps"] == 30
    assert body["cost_spot"]["low"] <= body["cost_spot"]["high"]
    assert elapsed < 0.5
    # Besides authentication and the rate limit: a constant 7, whatever the history's size.
    own = [q["sql"] for q in queries if any(t in q["sql"] for t in ("training_", "billing_"))]
    assert len(own) <= 8, own


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("&overrides=not-json", 422),
        ("&overrides=[1]", 422),
        ('&overrides={"lora_r": 0}', 422),
        ("&gpu_type=tpu-v9", 422),
        ("&preset=nope", 422),
        ("&base_model=nope", 422),
        ("&executor=mars", 422),
    ],
)
def test_cost_estimate_bad_input(api_as, training_file, query, status):
    response = api_as(Role.VIEWER).get(
        f"training/cost-estimate?training_file_id={training_file.pk}{query}"
    )
    assert_envelope(response, status)


def test_cost_estimate_unknown_file_is_404(api_as, db):
    response = api_as(Role.VIEWER).get(
        "training/cost-estimate?training_file_id=00000000-0000-0000-0000-000000000000"
    )
    assert_envelope(response, 404, "not_found")


def test_prices_list(api_as, db):
    response = api_as(Role.VIEWER).get("billing/prices")
    assert response.status_code == 200
    assert {p["gpu_type"] for p in response.json()} >= {"h100-pcie-80gb", "cpu-local"}


def test_reestimate_scales_the_model_by_the_measured_speed(
    training_file, smollm, smoke, notional_local_rate
):
    """While training, the job's measured time against the model's prediction for the same
    steps scales what is left: twice as slow, twice the time left; the whole run projected
    at the measured speed is that ratio x the model's training and finalization."""
    from django.utils import timezone

    from billing.estimates import reestimate_running
    from training.models import MetricPoint

    start = timezone.now() - timedelta(hours=1)
    job = make_job(
        training_file=training_file,
        base_model=smollm,
        preset=smoke,
        executor="local",
        gpu_type="",
        status=S.TRAINING,
        start=start,
        stages=[(S.QUEUED, -1), (S.PROVISIONING, 0), (S.TRAINING, 10)],
    )
    cost = services.job_cost_record(job=job)
    est = cost.estimate
    assert est["model"]["coefficients"]["token_s"] > 0
    type(job).objects.filter(pk=job.pk).update(total_steps=est["steps"], current_step=3)
    job.refresh_from_db()
    entered = start + timedelta(seconds=10)
    point = MetricPoint.objects.create(job=job, step=3)
    transitions = list(job.transitions.all())

    def projection(elapsed):
        point.recorded_at = entered + timedelta(seconds=elapsed)
        return reestimate_running(
            job=job,
            transitions=transitions,
            last_point=point,
            rate_per_hour=1.0,
            accrued=0.0,
            now=point.recorded_at,
            estimate=est,
        )

    one, two = projection(40.0), projection(80.0)
    assert two["speed_vs_estimate"] == pytest.approx(2 * one["speed_vs_estimate"], rel=1e-3)
    assert two["seconds_left"] == pytest.approx(2 * one["seconds_left"], rel=1e-3)
    model_total = est["training_seconds"] + est["phases"]["finalization"]
    assert 40.0 + one["seconds_left"] == pytest.approx(
        one["speed_vs_estimate"] * model_total, rel=1e-3
    )


def test_job_cost_detail_gives_cost_so_far_estimate_range_and_projected_variance(
    training_file, smollm, smoke
):
    from django.utils import timezone

    from training.models import MetricPoint

    GpuPrice.objects.filter(gpu_type="cpu-local").update(
        spot_per_hour=Decimal("100"), on_demand_per_hour=Decimal("100")
    )

    start = timezone.now() - timedelta(seconds=600)
    job = make_job(
        training_file=training_file,
        base_model=smollm,
        preset=smoke,
        executor="local",
        gpu_type="",
        status=S.TRAINING,
        start=start,
        stages=[(S.QUEUED, -1), (S.PROVISIONING, 0), (S.TRAINING, 10)],
    )
    cost = services.job_cost_record(job=job)
    type(job).objects.filter(pk=job.pk).update(total_steps=cost.estimate["steps"])
    # Far slower than estimated: one step in 590 s.
    point = MetricPoint.objects.create(job=job, step=1)
    MetricPoint.objects.filter(pk=point.pk).update(recorded_at=start + timedelta(seconds=600))
    services.costs_accrue(now=start + timedelta(seconds=600))
    detail = services.job_cost_detail(job_id=job.pk)
    assert detail["accrued"] == services.money(Decimal(600) * 100 / 3600)
    assert detail["estimate_low"] < detail["estimate"] < detail["estimate_high"]
    assert detail["variance_pct"] == pytest.approx(
        100 * (float(detail["accrued"]) / float(detail["estimate"]) - 1), abs=0.5
    )
    assert detail["warning_percent"] == 20
    assert detail["projection"]["final_cost"] > float(detail["accrued"])
    assert detail["projected_variance_pct"] > 20 and detail["projected_warning"] is True
