"""Spot preemption recovery: from a preempted pod to the relaunched worker's first training step.

Setup: the loopback RunPod (tests/training/runpod_server.py) behind the real runpod SDK and
RunPod executor; each pod runs the real worker (`python -m gpu.train`, SmolLM2-135M on this
CPU) reporting by webhooks to this process's platform. One spot job (checkpoint every
CHECKPOINT_EVERY steps) is preempted PREEMPTIONS times, each time right after a new
checkpoint: the pod is killed and reported gone. The reconcile step runs at the production
cadence (the Celery beat entry `reconcile-training-jobs`), so detection waits for it as in
production.

Measured per preemption: detection (kill -> reconcile notices), relaunch (-> new pod
created), worker start-up to model loaded, and the subject: kill -> the relaunched worker's
first training step (its first `metrics` event). Baseline, in the same run: the job's first
launch, start -> first training step (the same work minus detection and checkpoint loading).
Printed: the median subject with the checkpoint interval, the ratio to the baseline, and
the seed's bound (resume within 10 minutes). Target: under 60 s plus the model load time.

Not alternated, on purpose: the baseline is the same job's first launch and the subject its
recoveries, so the baseline always comes first (a job cannot be preempted before it starts),
and the sides are not the same number of runs (one launch, PREEMPTIONS recoveries). Both run
in the same job on the same machine minutes apart; the subject is printed with its spread,
and the ratio is median subject / the one baseline launch.
"""

from __future__ import annotations

import io
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench._alternate import spread

REPO = Path(__file__).resolve().parents[1]
PREEMPTIONS = 3
CHECKPOINT_EVERY = 2
MAX_STEPS = CHECKPOINT_EVERY * (PREEMPTIONS + 1)
SEED_BOUND_S = 600.0
TIMEOUT_S = 900


def _serve_platform():
    """The platform's webhook endpoint on a loopback port, as `manage.py train` serves it."""
    from django.conf import settings
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler

    class Quiet(WSGIRequestHandler):
        def log_message(self, format, *args):
            pass

    server = ThreadedWSGIServer(("127.0.0.1", 0), Quiet)
    server.set_app(WSGIHandler())
    threading.Thread(target=server.serve_forever, daemon=True, name="platform").start()
    settings.CRUCIBLE_PUBLIC_URL = f"http://127.0.0.1:{server.server_address[1]}"
    return server


def _conversations(n: int) -> bytes:
    import json

    rows = [
        {
            "id": f"c-{i}",
            "system_prompt": "You are a warm, careful financial advisor.",
            "training_pairs": [
                {
                    "user_input": f"How should I plan savings goal number {i}?",
                    "target_response": "Start small, automate a monthly transfer, review it.",
                }
            ],
        }
        for i in range(n)
    ]
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def _first_step_after(job, after) -> float | None:
    """Seconds since the epoch of the first training metrics event received after ``after``."""
    from training.models import WebhookEvent

    event = (
        WebhookEvent.objects.filter(job=job, type="metrics", received_at__gt=after)
        .order_by("received_at")
        .first()
    )
    return event.received_at.timestamp() if event else None


def _stage_at(job, stage: str, after) -> float | None:
    from training.models import WebhookEvent

    for event in WebhookEvent.objects.filter(job=job, type="stage", received_at__gt=after).order_by(
        "received_at"
    ):
        if (event.payload.get("data") or {}).get("stage") == stage:
            return event.received_at.timestamp()
    return None


def _median_step_seconds(job) -> float:
    """Time between consecutive training steps within one worker (metrics events)."""
    from training.models import WebhookEvent

    previous = None
    gaps = []
    for event in WebhookEvent.objects.filter(job=job, type="metrics").order_by("received_at"):
        data = event.payload.get("data") or {}
        step, at = data.get("step"), event.received_at.timestamp()
        if previous and data.get("val_loss") is None and step == previous[0] + 1:
            gaps.append(at - previous[1])
        if data.get("val_loss") is None:
            previous = (step, at)
    return statistics.median(gaps) if gaps else float("nan")


def main() -> None:
    os.environ.setdefault("CRUCIBLE_MODEL_CACHE", str(REPO / "var" / "models"))
    import runpod
    from django.conf import settings
    from django.utils import timezone

    from corpora.services import training_file_create
    from tests.training.runpod_server import LoopbackRunPod
    from training import services
    from training.models import BaseModel, Preset, TrainingJob

    reconcile_every = float(settings.CELERY_BEAT_SCHEDULE["reconcile-training-jobs"]["schedule"])
    volume = Path(tempfile.mkdtemp(prefix="crucible-volume-"))
    (volume / "crucible").mkdir()
    (volume / "crucible" / "models").symlink_to(os.environ["CRUCIBLE_MODEL_CACHE"])
    server = _serve_platform()
    loopback = LoopbackRunPod(volume_dir=volume, log_dir=volume / "pods").start()
    saved_env = os.environ.get("RUNPOD_API_BASE_URL")
    try:
        settings.TRAINING_LAUNCH_INLINE = True
        settings.TRAINING_MAX_RECOVERIES = PREEMPTIONS + 2
        settings.RUNPOD_API_KEY = loopback.api_key
        settings.RUNPOD_API_BASE_URL = loopback.url
        settings.RUNPOD_IMAGE = "crucible-worker:bench"
        settings.RUNPOD_ON_DEMAND_AFTER_PREEMPTIONS = 0  # spot every time
        training_file = training_file_create(
            name="bench-recovery", upload=io.BytesIO(_conversations(24)), user=None
        )
        job = services.training_job_create(
            user=None,
            training_file=training_file,
            base_model=BaseModel.objects.get(name="SmolLM2-135M-Instruct"),
            preset=Preset.objects.get(key="smoke"),
            overrides={
                "max_steps": MAX_STEPS,
                "num_epochs": 5,
                "lora_r": 4,
                "lora_alpha": 8,
                "micro_batch_size": 1,
                "gradient_accumulation_steps": 1,
                "max_seq_length": 128,
                "checkpoint_every_steps": CHECKPOINT_EVERY,
                "heartbeat_seconds": 5,
                "validation_split": 0.1,
            },
            name="bench recovery",
            executor="runpod",
            spot=True,
        )
        started = timezone.now()
        services.training_job_start(job=job, user=None)

        kills: list[float] = []
        deadline = time.monotonic() + TIMEOUT_S
        last_reconcile = time.monotonic()
        seen_checkpoint = 0
        while time.monotonic() < deadline:
            job = TrainingJob.objects.get(pk=job.pk)
            if job.is_terminal:
                break
            newest = job.checkpoints.order_by("-step").first()
            if newest and newest.step > seen_checkpoint:
                seen_checkpoint = newest.step
                if len(kills) < PREEMPTIONS and job.executor_ref in loopback.pods:
                    loopback.preempt(job.executor_ref)
                    kills.append(time.time())
            if time.monotonic() - last_reconcile >= reconcile_every:
                services.training_jobs_reconcile()
                last_reconcile = time.monotonic()
            time.sleep(0.1)
        job = TrainingJob.objects.get(pk=job.pk)
        if job.status != "completed" or len(kills) != PREEMPTIONS:
            print(f"  job ended {job.status} after {len(kills)} preemptions: {job.error_message}")
            return

        baseline = _first_step_after(job, started) - started.timestamp()
        rows = []
        for kill, recovery in zip(kills, job.recoveries.order_by("detected_at"), strict=True):
            first = _first_step_after(job, recovery.relaunched_at)
            loading = _stage_at(job, "model_loading", recovery.relaunched_at)
            training = _stage_at(job, "training", recovery.relaunched_at)
            rows.append(
                {
                    "from_step": recovery.from_step,
                    "detect": recovery.detected_at.timestamp() - kill,
                    "relaunch": recovery.relaunch_seconds,
                    "model_load": (training - loading) if training and loading else float("nan"),
                    "total": first - kill,
                }
            )
        step_s = _median_step_seconds(job)
        interval_s = CHECKPOINT_EVERY * step_s
        print(
            f"  checkpoint interval: every {CHECKPOINT_EVERY} steps (~{interval_s:.1f} s at the "
            f"median {step_s:.1f} s a step on this CPU); reconcile every {reconcile_every:g} s; "
            f"{PREEMPTIONS} preemptions, job completed at step {job.current_step}"
        )
        for i, row in enumerate(rows, 1):
            print(
                f"  preemption {i} (resumed from step {row['from_step']}): detected "
                f"{row['detect']:.1f} s, pod relaunched +{row['relaunch']:.2f} s, model load "
                f"{row['model_load']:.1f} s, first training step {row['total']:.1f} s after kill"
            )
        median = statistics.median(r["total"] for r in rows)
        load = statistics.median(r["model_load"] for r in rows)
        print(f"baseline first launch -> first training step   {baseline:.1f} s")
        print(
            f"subject  preemption -> first step after resume  median {median:.1f} s "
            f"(model load {load:.1f} s of it; {median - load:.1f} s without); "
            f"{spread([r['total'] for r in rows], '.1f', 's', median=False)}"
        )
        print(
            f"ratio subject/baseline = {median / baseline:.2f}x; seed bound {SEED_BOUND_S:.0f} s: "
            f"{median / SEED_BOUND_S:.3f} of it; target < 60 s + model load: "
            f"{'met' if median - load < 60 else 'NOT met'}"
        )
    finally:
        loopback.stop()
        server.shutdown()
        if saved_env is None:
            os.environ.pop("RUNPOD_API_BASE_URL", None)
        else:
            os.environ["RUNPOD_API_BASE_URL"] = saved_env
        runpod.api_key = None
