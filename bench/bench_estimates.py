"""Estimate accuracy and speed.

What it measures: the worker (`python -m gpu.train`) is not in this tree yet, so real local
runs cannot be timed here. Instead, for five job sizes (the Smoke preset at 12, 24, 36, 48
and 60 steps), it fabricates completed local jobs whose stage times follow a
fixed 'machine' (1.1 s per step, +-5% seeded noise on training time) and, leave-one-out,
estimates each job from the others: the share of jobs whose actual held time falls within
15% of the point estimate (and inside the range), and, after re-estimation at 10% of the
steps (measured speed with +-5% noise), within 10%. It also times the estimate against a
baseline (loading the training file alone) and prints the ratio.
"""

from __future__ import annotations

import io
import json
import random
import time
from datetime import timedelta
from decimal import Decimal


def _conversations(n: int) -> bytes:
    rows = [
        {
            "id": f"b-{i}",
            "system_prompt": "You are a careful financial advisor.",
            "training_pairs": [
                {"user_input": f"How do I plan for goal {i}?", "target_response": "Save " * 30}
            ],
        }
        for i in range(n)
    ]
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def main() -> None:
    from django.utils import timezone

    from billing import services
    from billing.estimates import reestimate_running
    from billing.models import GpuPrice, JobCost
    from corpora.services import training_file_create
    from training.config import resolve_configuration
    from training.models import BaseModel, JobStatus, JobTransition, Preset, TrainingJob

    S = JobStatus
    rng = random.Random(7)
    GpuPrice.objects.filter(gpu_type="cpu-local").update(
        spot_per_hour=Decimal("1"), on_demand_per_hour=Decimal("1")
    )
    tf = training_file_create(name="bench", upload=io.BytesIO(_conversations(40)), user=None)
    smollm = BaseModel.objects.get(name="SmolLM2-135M-Instruct")
    smoke = Preset.objects.get(key="smoke")
    phases = [(S.PROVISIONING, 2.0), (S.PREPROCESSING, 6.0), (S.MODEL_LOADING, 12.0)]
    sizes = [12, 24, 36, 48, 60]

    def fabricate(steps: int, noise: float) -> tuple[TrainingJob, float]:
        configuration = resolve_configuration(
            preset_hyperparameters=smoke.hyperparameters,
            overrides={"max_steps": steps},
            context_length=smollm.context_length,
        )
        job = TrainingJob.objects.create(
            name=f"bench-{steps}",
            training_file=tf,
            base_model=smollm,
            preset=smoke,
            configuration=configuration,
            executor="local",
            status=S.COMPLETED,
            current_step=steps,
            total_steps=steps,
        )
        start = timezone.now() - timedelta(hours=2)
        t, previous = 0.0, S.QUEUED
        stages = [*phases, (S.TRAINING, 1.1 * steps * (1 + noise)), (S.FINALIZATION, 40.0)]
        for status, seconds in stages:
            row = JobTransition.objects.create(job=job, from_status=previous, to_status=status)
            JobTransition.objects.filter(pk=row.pk).update(at=start + timedelta(seconds=t))
            t += seconds
            previous = status
        done = JobTransition.objects.create(job=job, from_status=previous, to_status=S.COMPLETED)
        JobTransition.objects.filter(pk=done.pk).update(at=start + timedelta(seconds=t))
        TrainingJob.objects.filter(pk=job.pk).update(completed_at=start + timedelta(seconds=t))
        JobCost.objects.create(job=job, gpu_type="cpu-local", rate_per_hour=Decimal("1"))
        return job, t

    jobs = [fabricate(steps, rng.uniform(-0.05, 0.05)) for steps in sizes]
    within15 = inside = within10 = 0
    for job, actual in jobs:
        TrainingJob.objects.filter(pk=job.pk).update(status=S.FAILED)  # leave it out
        est = services.cost_estimate(
            training_file=tf,
            base_model=smollm,
            preset=smoke,
            overrides={"max_steps": job.total_steps},
            executor="local",
        )
        TrainingJob.objects.filter(pk=job.pk).update(status=S.COMPLETED)
        d = est.duration_seconds
        error = d["point"] / actual - 1
        within15 += abs(error) <= 0.15
        inside += d["low"] <= actual <= d["high"]
        # Re-estimation at 10% of the steps, from the measured speed of this run.
        tenth = max(1, job.total_steps // 10)
        measured = 1.1 * (1 + rng.uniform(-0.05, 0.05))
        now = timezone.now()
        entered = type(
            "T", (), {"to_status": "training", "at": now - timedelta(seconds=tenth * measured)}
        )
        point = type("P", (), {"step": tenth, "recorded_at": now})
        job.status, job.recovery_count = "training", 0
        projection = reestimate_running(
            job=job,
            transitions=[entered],
            last_point=point,
            rate_per_hour=1.0,
            accrued=0.0,
            now=now,
            phases=est.phases,
        )
        elapsed_so_far = sum(s for _, s in phases) + tenth * measured
        re_total = elapsed_so_far + projection["seconds_left"]
        within10 += abs(re_total / actual - 1) <= 0.10
        print(
            f"  {job.total_steps:3d} steps: actual {actual:7.1f} s, estimate "
            f"{d['low']:.0f}-{d['high']:.0f} s (point {d['point']:.1f}, {100 * error:+.1f}%), "
            f"re-estimate at 10%: {re_total:.1f} s ({100 * (re_total / actual - 1):+.1f}%)"
        )
    n = len(jobs)
    print(f"  within 15% before start: {within15}/{n}; inside the range: {inside}/{n}")
    print(f"  within 10% after re-estimation at 10% of steps: {within10}/{n}")

    rounds = 50
    began = time.perf_counter()
    for _ in range(rounds):
        services.cost_estimate(
            training_file=tf,
            base_model=smollm,
            preset=smoke,
            overrides={"max_steps": 30},
            executor="local",
        )
    estimate_s = (time.perf_counter() - began) / rounds
    from corpora.models import TrainingFile

    began = time.perf_counter()
    for _ in range(rounds):
        TrainingFile.objects.get(pk=tf.pk)
    baseline_s = (time.perf_counter() - began) / rounds
    print(
        f"  estimate: {1000 * estimate_s:.2f} ms (baseline: one training-file load "
        f"{1000 * baseline_s:.2f} ms; ratio {estimate_s / baseline_s:.1f}x)"
    )
