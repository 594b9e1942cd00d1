"""Estimate accuracy on real local jobs, and the estimate's speed.

What it measures: six real training jobs on this machine (the worker `python -m gpu.train`
launched by the local executor, SmolLM2-135M on the CPU, webhooks to a loopback server as in
`manage.py train`), of different sizes and presets: training files of 12, 24 and 45
conversations, sequence lengths 512 and 768, micro-batches 1-2 with gradient accumulation
1-4, 2-12 steps, the Smoke, Conservative, Balanced and Aggressive presets (their LoRA ranks;
steps and lengths cut to CPU size). Each job is estimated right before it starts, as in
production, from the history of the jobs this bench finished before it (the first from the
prior). Printed: each job's estimate and actual held time (provisioning to completion, what
the ledger bills), the share whose actual duration is within 15% of the estimate's point,
the share inside the estimated range, and the share within 15% after re-estimation from
the measured speed at 10% of the steps (the live projection of billing.services).

Target (the seed): 90% of jobs within 15%. The machine's 2 cores are shared (the load
average is printed before and after): contention the history did not see shows up as error.

The accuracy part is not a subject-against-baseline comparison (each job runs once, and its
estimate depends on the jobs before it), so there is nothing to alternate there.
BENCH_ESTIMATES_JOBS (default: all 6) runs only the first N jobs, for a quick check.

Then the speed of GET /api/v1/training/cost-estimate's work (billing.services.cost_estimate
with that history) against a baseline (loading the training file alone), as a ratio: the
two alternate call by call (bench/_alternate.py, the order flipping every round), 50 calls
each, and the figures are medians of both sides with their IQR and min-max.
"""

from __future__ import annotations

import io
import os
import statistics
import threading
import time
from decimal import Decimal
from pathlib import Path

from bench._alternate import alternate, spread

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "training" / "financial_advisor_v1.jsonl"
TIMEOUT_S = 900

# (preset, conversations in the file, overrides)
JOBS = [
    ("smoke", 12, {"micro_batch_size": 1, "max_steps": 3, "checkpoint_every_steps": 3}),
    (
        "conservative",
        24,
        {
            "micro_batch_size": 1,
            "gradient_accumulation_steps": 2,
            "max_seq_length": 512,
            "max_steps": 3,
            "checkpoint_every_steps": 3,
        },
    ),
    ("smoke", 45, {"max_steps": 6, "checkpoint_every_steps": 3, "validation_split": 0.1}),
    (
        "aggressive",
        12,
        {
            "micro_batch_size": 1,
            "gradient_accumulation_steps": 1,
            "max_seq_length": 768,
            "max_steps": 4,
            "checkpoint_every_steps": 2,
        },
    ),
    (
        "balanced",
        24,
        {
            "micro_batch_size": 1,
            "gradient_accumulation_steps": 4,
            "max_seq_length": 512,
            "max_steps": 2,
            "checkpoint_every_steps": 2,
        },
    ),
    ("smoke", 45, {}),  # the Smoke preset as it is: 12 steps of 2 x 512 tokens
]


def _serve_webhooks():
    """The platform's webhook endpoint on a loopback port, as `manage.py train` serves it."""
    from django.conf import settings
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler

    class Quiet(WSGIRequestHandler):
        def log_message(self, format, *args):
            pass

    server = ThreadedWSGIServer(("127.0.0.1", 0), Quiet)
    server.set_app(WSGIHandler())
    threading.Thread(target=server.serve_forever, daemon=True, name="webhooks").start()
    settings.CRUCIBLE_PUBLIC_URL = f"http://127.0.0.1:{server.server_address[1]}"
    return server


def _run(training_file, preset, overrides: dict, name: str) -> dict:
    """Create, estimate (at start), run and follow one job; re-estimate at 10% of its steps."""
    from django.utils import timezone

    from billing.models import JobCost
    from billing.services import job_cost_accrue
    from training import services
    from training.models import BaseModel

    job = services.training_job_create(
        user=None,
        training_file=training_file,
        base_model=BaseModel.objects.get(name="SmolLM2-135M-Instruct"),
        preset=preset,
        name=name,
        overrides=overrides,
        executor="local",
    )
    services.training_job_start(job=job, user=None)  # estimates, reserves, launches
    estimate = JobCost.objects.get(job=job).estimate
    tenth = max(1, -(-estimate["steps"] // 10))  # ceil(10% of the steps)
    re_total = None
    deadline = time.monotonic() + TIMEOUT_S
    last_reconcile = 0.0
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.is_terminal:
            break
        if re_total is None and job.status == "training" and job.current_step >= tenth:
            cost = job_cost_accrue(job=job, now=timezone.now())
            if cost.projection:
                re_total = cost.held_seconds + cost.projection["seconds_left"]
        if time.monotonic() - last_reconcile > 5:
            services.training_jobs_reconcile()
            last_reconcile = time.monotonic()
        time.sleep(0.25)
    cost = JobCost.objects.get(job=job)
    return {
        "job": job,
        "estimate": estimate,
        "held": cost.held_seconds,
        "cost": float(cost.accrued),
        "re_total": re_total,
        "tenth": tenth,
    }


def main() -> None:
    os.environ.setdefault("CRUCIBLE_MODEL_CACHE", str(REPO / "var" / "models"))
    from django.conf import settings

    settings.TRAINING_MODEL_CACHE = os.environ["CRUCIBLE_MODEL_CACHE"]
    settings.TRAINING_LAUNCH_INLINE = True
    import logging

    logging.getLogger("crucible").setLevel(logging.WARNING)

    from billing import services as billing
    from billing.models import GpuPrice
    from corpora.models import TrainingFile
    from corpora.services import training_file_create
    from training.models import BaseModel, Preset

    # A notional $1/h for the local CPU (its catalog price is $0) so the costs are figures.
    GpuPrice.objects.filter(gpu_type="cpu-local").update(
        spot_per_hour=Decimal("1"), on_demand_per_hour=Decimal("1")
    )
    lines = SAMPLE.read_bytes().splitlines(keepends=True)
    files = {
        n: training_file_create(
            name=f"bench-{n}", upload=io.BytesIO(b"".join(lines[:n])), user=None
        )
        for n in sorted({conversations for _, conversations, _ in JOBS})
    }
    server = _serve_webhooks()
    load_before = os.getloadavg()
    print(f"  load average before: {load_before[0]:.1f} (1 min) on {os.cpu_count()} CPUs")
    results = []
    began = time.monotonic()
    jobs = JOBS[: int(os.environ.get("BENCH_ESTIMATES_JOBS", len(JOBS)))]
    try:
        for i, (key, conversations, overrides) in enumerate(jobs, 1):
            preset = Preset.objects.get(key=key)
            r = _run(files[conversations], preset, overrides, name=f"bench-{i}-{key}")
            results.append(r)
            e, d = r["estimate"], r["estimate"]["duration_seconds"]
            hp = r["job"].configuration["hyperparameters"]
            if r["job"].status != "completed":
                print(f"  job {i} ended {r['job'].status}: {r['job'].error_message}")
                continue
            error = d["point"] / r["held"] - 1
            re = (
                f"{r['re_total']:.0f} s ({100 * (r['re_total'] / r['held'] - 1):+.1f}%)"
                if r["re_total"]
                else "none"
            )
            print(
                f"  {i}. {key:12s} {conversations:2d} conv, seq {hp['max_seq_length']}, "
                f"{hp['micro_batch_size']}x{hp['gradient_accumulation_steps']} rows, "
                f"{e['steps']:2d} steps | {e['basis']} ({e['history_jobs']} jobs): "
                f"{d['low']:.0f}-{d['high']:.0f} s, point {d['point']:.0f} s | actual "
                f"{r['held']:.0f} s ({100 * error:+.1f}%), cost ${r['cost']:.4f} in "
                f"${e['cost']['low']:.4f}-{e['cost']['high']:.4f} | re-estimate at step "
                f"{r['tenth']}: {re}"
            )
    finally:
        server.shutdown()
        server.server_close()
    load_after = os.getloadavg()
    done = [r for r in results if r["job"].status == "completed"]
    n = len(done)

    def share(items, test) -> str:
        hits = sum(1 for r in items if test(r))
        return f"{hits}/{len(items)} ({100 * hits / len(items):.0f}%)" if items else "-"

    def within(r, value):
        return value is not None and abs(value / r["held"] - 1) <= 0.15

    with_history = [r for r in done if r["estimate"]["basis"] == "history"]
    d = "duration_seconds"
    print(
        f"  {n} jobs in {time.monotonic() - began:.0f} s; load average after: "
        f"{load_after[0]:.1f} (1 min), {load_after[2]:.1f} (15 min)"
    )
    point_within = lambda r: within(r, r["estimate"][d]["point"])  # noqa: E731
    print(f"  within 15% before start: {share(done, point_within)}")
    print(f"  within 15% before start, estimated from history: {share(with_history, point_within)}")
    print(
        "  actual inside the estimated range: "
        f"{share(done, lambda r: r['estimate'][d]['low'] <= r['held'] <= r['estimate'][d]['high'])}"
    )
    print(
        f"  within 15% after re-estimation at 10% of the steps: "
        f"{share(done, lambda r: within(r, r['re_total']))}"
    )

    # The estimate's speed (what GET /api/v1/training/cost-estimate does) with this history.
    rounds = 50
    tf, smoke = files[45], Preset.objects.get(key="smoke")
    smollm = BaseModel.objects.get(name="SmolLM2-135M-Instruct")
    kwargs = dict(training_file=tf, base_model=smollm, preset=smoke, executor="local")
    billing.cost_estimate(**kwargs)  # warm
    TrainingFile.objects.get(pk=tf.pk)
    estimate_ms, baseline_ms = alternate(
        lambda: billing.cost_estimate(**kwargs), lambda: TrainingFile.objects.get(pk=tf.pk), rounds
    )
    estimate, baseline = statistics.median(estimate_ms), statistics.median(baseline_ms)
    print(
        f"  estimate: {estimate:.2f} ms with {len(done)} jobs of history (baseline: "
        f"one training-file load {baseline:.2f} ms; ratio {estimate / baseline:.1f}x)"
    )
    print(
        f"    estimate {spread(estimate_ms, unit='ms')}; training-file load "
        f"{spread(baseline_ms, unit='ms')} ({rounds} each, alternating)"
    )
