"""The estimate against real local Smoke jobs (the worker as a subprocess, SmolLM2 on the CPU).

Two tiny jobs, back to back as a user would run them: the first is estimated from the prior,
the second (a different size) from the first one's measured history. The second's range must
hold its actual duration and cost (the GPU time the ledger accrued from the stored stage
times), and it is re-estimated from its measured speed once it trains.
"""

import io
import time
from decimal import Decimal
from pathlib import Path

import pytest

from billing.models import GpuPrice, JobCost
from corpora.services import training_file_create
from tests.training.test_end_to_end import platform  # noqa: F401 - the live-server fixture
from training import services
from training.models import BaseModel, JobStatus, Preset

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "samples" / "training" / "financial_advisor_v1.jsonl"

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def run_job(training_file, *, name: str, overrides: dict, timeout: float = 600) -> dict:
    """Create, start and follow a local Smoke job; the figures the test checks."""
    job = services.training_job_create(
        user=None,
        training_file=training_file,
        base_model=BaseModel.objects.get(name="SmolLM2-135M-Instruct"),
        preset=Preset.objects.get(key="smoke"),
        name=name,
        overrides=overrides,
        executor="local",
    )
    services.training_job_start(job=job, user=None)
    estimate = JobCost.objects.get(job=job).estimate  # stored at start, before launch
    projection = None
    deadline = time.monotonic() + timeout
    last = 0.0
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.is_terminal:
            break
        if time.monotonic() - last > 2:
            services.training_jobs_reconcile()  # the scheduler's step: accrues live cost
            last = time.monotonic()
            cost = JobCost.objects.get(job=job)
            if projection is None and cost.projection:
                projection = {**cost.projection, "held_then": cost.held_seconds}
        time.sleep(0.5)
    assert job.status == JobStatus.COMPLETED, (job.status, job.error_type, job.error_message)
    cost = JobCost.objects.get(job=job)
    assert cost.finalized_at is not None
    return {
        "job": job,
        "estimate": estimate,
        "held": cost.held_seconds,
        "cost": float(cost.accrued),
        "projection": projection,
    }


def test_estimate_range_holds_a_real_local_smoke_job(platform, settings):  # noqa: F811
    settings.RATELIMIT_ENABLE = False
    # A notional $1/h for the local CPU (its catalog price is $0), so costs are not all zero.
    GpuPrice.objects.filter(gpu_type="cpu-local").update(
        spot_per_hour=Decimal("1.00"), on_demand_per_hour=Decimal("1.00")
    )
    lines = SAMPLE.read_bytes().splitlines(keepends=True)[:12]
    training_file = training_file_create(
        name="small", upload=io.BytesIO(b"".join(lines)), user=None
    )
    small = {"micro_batch_size": 1, "checkpoint_every_steps": 2, "validation_split": 0.1}

    first = run_job(training_file, name="first", overrides={**small, "max_steps": 2})
    assert first["estimate"]["basis"] == "prior"
    # The prior was measured on one quiet machine; its low end allows a CPU 1.5x faster.
    assert first["held"] >= first["estimate"]["duration_seconds"]["low"], first

    second = run_job(training_file, name="second", overrides={**small, "max_steps": 5})
    est = second["estimate"]
    assert est["basis"] == "history" and est["history_jobs"] == 1
    d, c = est["duration_seconds"], est["cost"]
    figures = (
        f"second job: estimate {d}, actual {second['held']:.1f} s; first job: estimate "
        f"{first['estimate']['duration_seconds']}, actual {first['held']:.1f} s"
    )
    print(figures, "re-estimate:", second["projection"])
    assert d["low"] <= second["held"] <= d["high"], figures
    assert c["low"] <= second["cost"] <= c["high"], (c, second["cost"])
    assert second["cost"] == pytest.approx(second["held"] / 3600, abs=1e-3)
    # Re-estimated from its measured speed while it trained.
    projection = second["projection"]
    assert projection and projection["total_steps"] == 5 and projection["measured_steps"] >= 1
    assert projection["seconds_per_step"] > 0 and projection["speed_vs_estimate"] > 0
