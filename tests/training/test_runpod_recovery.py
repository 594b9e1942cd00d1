"""RunPod jobs end to end on the loopback RunPod: each pod runs the real worker on this CPU.

The platform runs in pytest-django's live server (the workers' webhooks reach it); the
loopback RunPod (tests/training/runpod_server.py) answers the runpod SDK and runs each pod's
container command (`python -m gpu.train` with the pod's environment) as a subprocess, so
preemptions kill real workers and resumes read real checkpoints.
"""

import io
import time
from pathlib import Path

import pytest
import runpod

from config.roles import Role
from config.storage import (
    storage_exists,
    storage_is_s3,
    storage_listdir,
    storage_path_from_uri,
)
from corpora.services import training_file_create
from tests.conftest import ApiClient
from tests.factories import TokenFactory, UserFactory
from tests.training.conftest import conversations
from tests.training.runpod_server import LoopbackRunPod
from training import services
from training.executors import runpod as runpod_executor
from training.models import (
    BaseModel,
    Checkpoint,
    JobStatus,
    Preset,
    TrainingJob,
    TrainingPod,
    WebhookEvent,
)

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "crucible-worker:test"
H100 = "NVIDIA H100 PCIe"
# A short real run: 6 optimizer steps on short rows, a checkpoint every 2 steps.
TINY = {
    "max_steps": 6,
    "num_epochs": 3,
    "lora_r": 4,
    "lora_alpha": 8,
    "micro_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "max_seq_length": 128,
    "checkpoint_every_steps": 2,
    "heartbeat_seconds": 5,
    "validation_split": 0.1,
}

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def loopback(live_server, settings, monkeypatch, tmp_path):
    volume = tmp_path / "volume"
    (volume / "crucible").mkdir(parents=True)
    (volume / "crucible" / "models").symlink_to(ROOT / "var" / "models")
    with LoopbackRunPod(volume_dir=volume, log_dir=tmp_path / "pods", stop_grace_s=5) as server:
        monkeypatch.setenv("RUNPOD_API_BASE_URL", server.url)
        monkeypatch.setattr(runpod, "api_key", None)
        monkeypatch.setattr(runpod_executor, "_gpu_cache", {"at": 0.0, "rows": []})
        settings.CRUCIBLE_PUBLIC_URL = live_server.url
        settings.TRAINING_LAUNCH_INLINE = True
        settings.RATELIMIT_ENABLE = False
        settings.RUNPOD_API_KEY = server.api_key
        settings.RUNPOD_API_BASE_URL = server.url
        settings.RUNPOD_IMAGE = IMAGE
        settings.RUNPOD_ON_DEMAND_AFTER_PREEMPTIONS = 2
        yield server


def runpod_job(*, spot=True, name="runpod") -> TrainingJob:
    training_file = training_file_create(
        name="advisor", upload=io.BytesIO(conversations(24)), user=None
    )
    job = services.training_job_create(
        user=None,
        training_file=training_file,
        base_model=BaseModel.objects.get(name="SmolLM2-135M-Instruct"),
        preset=Preset.objects.get(key="smoke"),
        overrides=TINY,
        name=name,
        executor="runpod",
        spot=spot,
    )
    services.training_job_start(job=job, user=None)
    return TrainingJob.objects.get(pk=job.pk)


def wait_for(server, job_id, predicate, timeout=300, reconcile_every=2.0, poll=0.1):
    """Poll the job (running the scheduler's reconcile step meanwhile) until predicate holds."""
    deadline = time.monotonic() + timeout
    last = 0.0
    while time.monotonic() < deadline:
        job = TrainingJob.objects.get(pk=job_id)
        if predicate(job):
            return job
        if time.monotonic() - last > reconcile_every:
            services.training_jobs_reconcile()
            last = time.monotonic()
        time.sleep(poll)
    job = TrainingJob.objects.get(pk=job_id)
    logs = "\n".join(server.log(p.pod_id)[-3000:] for p in TrainingPod.objects.filter(job=job))
    raise AssertionError(f"timed out in {job.status} at step {job.current_step}\n{logs}")


def newest_complete_checkpoint(job: TrainingJob) -> int:
    """The newest checkpoint in the job's storage (local disk or S3) with its manifest,
    which the worker writes last."""
    root = f"{storage_path_from_uri(job.output_uri)}/checkpoints"
    folders, _ = storage_listdir(root) if storage_exists(root) or storage_is_s3() else ([], [])
    steps = [
        int(name.split("-")[1])
        for name in folders
        if name.startswith("step-") and storage_exists(f"{root}/{name}/manifest.json")
    ]
    return max(steps, default=0)


def test_a_spot_job_preempted_twice_resumes_each_time_and_completes(loopback):
    job = runpod_job(spot=True)
    assert job.executor_ref in loopback.pods, job.error_message

    # First preemption: as soon as a checkpoint is reported, the pod disappears.
    job = wait_for(loopback, job.pk, lambda j: j.checkpoints.exists() or j.is_terminal)
    assert not job.is_terminal, (job.error_type, job.error_message, job.error_details)
    loopback.preempt(job.executor_ref, mode="gone")
    killed_at = [newest_complete_checkpoint(job)]

    # Second: in the relaunched pod, after a checkpoint past the first one; this time the
    # spot pod is stopped (outbid), which RunPod keeps (and bills) until it is terminated.
    job = wait_for(
        loopback,
        job.pk,
        lambda j: (
            j.is_terminal
            or (j.attempt == 2 and j.checkpoints.filter(step__gt=killed_at[0]).exists())
        ),
    )
    assert not job.is_terminal, (job.error_type, job.error_message, job.error_details)
    second_pod = job.executor_ref
    loopback.preempt(second_pod, mode="exited")
    killed_at.append(newest_complete_checkpoint(job))
    assert killed_at[1] > killed_at[0]

    job = wait_for(loopback, job.pk, lambda j: j.is_terminal, timeout=400)
    assert job.status == JobStatus.COMPLETED, (job.error_type, job.error_message)
    assert job.recovery_count == 2 and job.attempt == 3
    assert job.recovery_summary == "Interrupted 2x, resumed successfully"
    assert job.current_step == job.total_steps == TINY["max_steps"]

    # Each relaunch resumed from the newest complete checkpoint at the time of the kill.
    recoveries = list(job.recoveries.all())
    checks = [
        e.payload["data"]
        for e in WebhookEvent.objects.filter(job=job, type="resume_check").order_by("received_at")
    ]
    assert [c["resumed_from_step"] for c in checks] == killed_at
    assert all(c["passed"] for c in checks), checks
    for recovery, step in zip(recoveries, killed_at, strict=True):
        assert recovery.from_step is not None and recovery.from_step <= step
        assert recovery.relaunch_seconds is not None and recovery.relaunch_seconds < 60
    assert set(Checkpoint.objects.filter(job=job).values_list("step", flat=True)) >= set(killed_at)

    # Spot, spot again, then on-demand; every pod terminated, none left running or stopped
    # (the last one right after the completed event, by the platform's webhook handler).
    wait_for(loopback, job.pk, lambda j: not j.pods.filter(terminated_at__isnull=True).exists())
    pods = list(TrainingPod.objects.filter(job=job))
    assert [p.spot for p in pods] == [True, True, False]
    assert all(p.terminated_at for p in pods), [(p.pod_id, p.state) for p in pods]
    assert second_pod in loopback.terminated
    assert loopback.live_pods() == [] and loopback.pod_processes_alive() == []


def test_a_worker_error_fails_the_job_without_relaunch_and_terminates_its_pod(loopback):
    loopback.extra_env["CRUCIBLE_SIMULATE_ERROR"] = "oom"
    job = runpod_job(spot=True)
    job = wait_for(loopback, job.pk, lambda j: j.is_terminal)
    assert job.status == JobStatus.FAILED and job.error_type == "OutOfMemoryError"
    assert "max_seq_length=64" in job.error_details["fix"]  # micro_batch_size is already 1
    services.training_jobs_reconcile()  # nothing to recover: the worker reported the error
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED and job.attempt == 1 and job.recovery_count == 0
    wait_for(loopback, job.pk, lambda j: not j.pods.filter(terminated_at__isnull=True).exists())
    assert TrainingPod.objects.filter(job=job).count() == 1
    assert loopback.live_pods() == [] and loopback.pod_processes_alive() == []


def test_no_spot_capacity_then_switch_to_on_demand_starts_it_and_cancel_terminates_it(loopback):
    loopback.spot_capacity[H100] = 0
    job = runpod_job(spot=True)
    assert job.status == JobStatus.PROVISIONING and job.error_type == "GPUProvisioningError"
    assert job.error_details["fix"] == "Retry in a few minutes, or switch to on-demand."
    api = ApiClient(TokenFactory(user=UserFactory(role=Role.ENGINEER)))
    body = api.post(f"training/jobs/{job.pk}/switch-to-on-demand").json()
    assert body["spot"] is False and body["error_type"] == "", body
    job = wait_for(loopback, job.pk, lambda j: j.status == JobStatus.TRAINING or j.is_terminal)
    assert job.status == JobStatus.TRAINING, (job.error_type, job.error_message)
    pod = job.executor_ref
    assert not loopback.pods[pod].spot

    assert api.post(f"training/jobs/{job.pk}/cancel").json()["status"] == "cancelled"
    services.training_jobs_reconcile()  # at most one reconcile cycle
    assert pod not in loopback.pods and loopback.pod_processes_alive() == []
    assert TrainingPod.objects.get(pod_id=pod).terminated_at is not None
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED and job.error_type == ""
    assert "completed" not in WebhookEvent.objects.filter(job=job).values_list("type", flat=True)
