"""The RunPod executor against the loopback RunPod (tests/training/runpod_server.py).

The pods here run a stand-in command (a sleeper) instead of the worker, so these tests are
fast; test_runpod_recovery.py runs the real worker in the pods.
"""

import base64
import json
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import runpod
from django.test import Client
from django.utils import timezone

from billing.models import GpuPrice
from config.roles import Role
from tests.conftest import assert_envelope
from tests.training.runpod_server import LoopbackRunPod
from training import services
from training.executors import ExecutorState, get_executor
from training.executors import runpod as runpod_executor
from training.models import Checkpoint, JobStatus, TrainingJob, TrainingPod

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "crucible-worker:test"
H100 = "NVIDIA H100 PCIe"


@pytest.fixture
def loopback(tmp_path, settings, monkeypatch):
    volume = tmp_path / "volume"
    (volume / "crucible").mkdir(parents=True)
    (volume / "crucible" / "models").symlink_to(ROOT / "var" / "models")
    with LoopbackRunPod(volume_dir=volume, log_dir=tmp_path / "pods", stop_grace_s=5) as server:
        # The executor sets these process-wide (the SDK reads them there): restore them after.
        monkeypatch.setenv("RUNPOD_API_BASE_URL", server.url)
        monkeypatch.setattr(runpod, "api_key", None)
        monkeypatch.setattr(runpod_executor, "_gpu_cache", {"at": 0.0, "rows": []})
        settings.RUNPOD_API_KEY = server.api_key
        settings.RUNPOD_API_BASE_URL = server.url
        settings.RUNPOD_IMAGE = IMAGE
        settings.RUNPOD_CLOUD_TYPE = "SECURE"
        settings.RUNPOD_ON_DEMAND_AFTER_PREEMPTIONS = 2
        settings.TRAINING_LAUNCH_INLINE = True
        yield server


@pytest.fixture
def sleepers(loopback):
    """Pods run a sleeper instead of the worker (no training in these tests)."""
    loopback.image_commands[IMAGE] = [sys.executable, "-c", "import time; time.sleep(600)"]
    return loopback


@pytest.fixture
def inline_commit(monkeypatch):
    monkeypatch.setattr("django.db.transaction.on_commit", lambda fn, *a, **k: fn())


def make_job(training_file, smollm, smoke, *, spot=True, start=True, gpu_type=""):
    job = services.training_job_create(
        user=None,
        training_file=training_file,
        base_model=smollm,
        preset=smoke,
        name="rp",
        executor="runpod",
        spot=spot,
        gpu_type=gpu_type,
    )
    if start:
        services.training_job_start(job=job, user=None)
    return TrainingJob.objects.get(pk=job.pk)


def training(job, step=4):
    """What the worker's events would have done: training, with a checkpoint at ``step``."""
    TrainingJob.objects.filter(pk=job.pk).update(status=JobStatus.TRAINING, current_step=step)
    Checkpoint.objects.get_or_create(job=job, step=step, defaults={"uri": "u", "manifest_uri": "m"})
    return TrainingJob.objects.get(pk=job.pk)


def test_a_spot_job_rents_an_interruptible_pod_with_a_bid_and_the_spec_in_its_environment(
    sleepers, inline_commit, training_file, smollm, smoke, settings
):
    job = make_job(training_file, smollm, smoke, spot=True)
    assert job.status == JobStatus.PROVISIONING and job.executor_ref, job.error_message
    pod = sleepers.pods[job.executor_ref]
    assert pod.spot and pod.bid_per_gpu == 1.25  # the secure cloud's spot price for an H100
    assert pod.gpu_type_id == H100 and pod.image == IMAGE
    assert pod.name == f"crucible-{job.pk}-a1"
    mutations = [r["query"] for r in sleepers.requests if "podRentInterruptable" in r["query"]]
    assert len(mutations) == 1 and "bidPerGpu: 1.25" in mutations[0]
    spec = json.loads(base64.b64decode(pod.env["CRUCIBLE_JOB_SPEC_B64"]))
    assert spec["job_id"] == str(job.pk) and spec["resume"] is True
    assert spec["webhook"]["secret"] == job.webhook_secret
    assert pod.env["CRUCIBLE_MODEL_CACHE"] == "/runpod-volume/crucible/models"
    # The platform's own RunPod key never reaches a pod.
    assert settings.RUNPOD_API_KEY not in json.dumps(pod.env)
    assert not [k for k in pod.env if k.startswith("RUNPOD_")]
    record = TrainingPod.objects.get(pod_id=job.executor_ref)
    assert record.spot and record.bid_per_gpu == Decimal("1.25") and record.attempt == 1
    status = get_executor("runpod").status(ref=job.executor_ref)
    assert status.state == ExecutorState.RUNNING


def test_an_on_demand_job_deploys_through_create_pod(
    sleepers, inline_commit, training_file, smollm, smoke
):
    from billing.services import gpu_prices_refresh

    gpu_prices_refresh()  # the catalogue learns the A100's price from RunPod
    job = make_job(training_file, smollm, smoke, spot=False, gpu_type="a100-pcie-80gb")
    pod = sleepers.pods[job.executor_ref]
    assert not pod.spot and pod.gpu_type_id == "NVIDIA A100 80GB PCIe"
    assert any("podFindAndDeployOnDemand" in r["query"] for r in sleepers.requests)
    assert TrainingPod.objects.get(pod_id=pod.id).cost_per_hour == Decimal("1.6400")


def test_preemptions_relaunch_on_spot_then_on_demand_and_terminate_the_old_pods(
    sleepers, inline_commit, training_file, smollm, smoke
):
    job = training(make_job(training_file, smollm, smoke, spot=True), step=4)
    first = job.executor_ref
    sleepers.preempt(first, mode="exited")  # an outbid spot pod: stopped, still billing storage
    summary = services.training_jobs_reconcile()
    assert summary["recovered"] == 1
    job.refresh_from_db()
    assert job.recovery_count == 1 and job.attempt == 2 and job.executor_ref != first
    assert sleepers.pods[job.executor_ref].spot  # spot again
    assert first not in sleepers.pods and first in sleepers.terminated  # the stopped one went
    recovery = job.recoveries.get()
    assert recovery.from_step == 4 and recovery.relaunch_seconds is not None
    assert TrainingPod.objects.get(pod_id=first).terminated_at is not None

    job = training(job, step=6)
    second = job.executor_ref
    sleepers.preempt(second)  # gone
    services.training_jobs_reconcile()
    job.refresh_from_db()
    assert (
        job.recovery_count == 2 and job.recovery_summary == "Interrupted 2x, resumed successfully"
    )
    assert not sleepers.pods[job.executor_ref].spot  # on-demand after 2 preemptions
    assert job.spot is False and job.warnings[-1]["code"] == "switched_to_on_demand"
    assert [r.from_step for r in job.recoveries.all()] == [4, 6]
    assert list(TrainingPod.objects.filter(job=job).values_list("spot", flat=True)) == [
        True,
        True,
        False,
    ]


def test_a_runpod_outage_is_neither_a_failure_nor_a_preemption(
    sleepers, inline_commit, training_file, smollm, smoke
):
    job = training(make_job(training_file, smollm, smoke))
    sleepers.fail_next(10)  # every retry of the pod query gets an error page
    assert get_executor("runpod").status(ref=job.executor_ref).state == ExecutorState.UNKNOWN
    sleepers.fail_next(10)
    services.training_jobs_reconcile()
    job.refresh_from_db()
    assert job.status == JobStatus.TRAINING and job.recovery_count == 0
    sleepers._failures.clear()
    assert get_executor("runpod").status(ref=job.executor_ref).state == ExecutorState.RUNNING


def test_no_capacity_is_retried_with_backoff_then_fails_with_the_suggestion(
    sleepers, inline_commit, training_file, smollm, smoke, settings
):
    sleepers.capacity[H100] = 0
    job = make_job(training_file, smollm, smoke, spot=True)
    assert job.status == JobStatus.PROVISIONING and not job.executor_ref
    assert job.error_type == "GPUProvisioningError" and job.error_details["waiting"] is True
    assert "switch to on-demand" in job.error_details["fix"]
    first_wait = (job.launch_retry_at - timezone.now()).total_seconds()
    assert (
        0.7 * settings.RUNPOD_LAUNCH_BACKOFF_S < first_wait < 1.3 * settings.RUNPOD_LAUNCH_BACKOFF_S
    )
    # Not due yet: nothing happens.
    assert services.training_jobs_reconcile()["launch_retries"] == 0
    # Due: tried again, still no capacity, a longer wait.
    TrainingJob.objects.filter(pk=job.pk).update(launch_retry_at=timezone.now())
    assert services.training_jobs_reconcile()["launch_retries"] == 1
    job.refresh_from_db()
    assert job.launch_tries == 2 and job.status == JobStatus.PROVISIONING
    second_wait = (job.launch_retry_at - timezone.now()).total_seconds()
    assert second_wait > 1.3 * settings.RUNPOD_LAUNCH_BACKOFF_S
    # Past the window: the job fails with the error and its suggestion.
    TrainingJob.objects.filter(pk=job.pk).update(
        launch_retry_at=timezone.now(),
        launch_waiting_since=timezone.now()
        - timedelta(seconds=settings.RUNPOD_LAUNCH_RETRY_WINDOW_S + 1),
    )
    services.training_jobs_reconcile()
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED and job.error_type == "GPUProvisioningError"
    assert "No NVIDIA H100 PCIe GPUs available" in job.error_message
    assert job.error_details["fix"] == "Retry in a few minutes, or switch to on-demand."
    assert not sleepers.pods and not TrainingPod.objects.filter(job=job).exists()


def test_switching_a_job_waiting_for_spot_capacity_to_on_demand_starts_it(
    sleepers, inline_commit, training_file, smollm, smoke, api_as
):
    sleepers.spot_capacity[H100] = 0  # spot sold out, on-demand available
    job = make_job(training_file, smollm, smoke, spot=True)
    assert job.waiting_for_capacity and job.error_type == "GPUProvisioningError"
    response = api_as(Role.ENGINEER).post(f"training/jobs/{job.pk}/switch-to-on-demand")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["id"] == str(job.pk) and body["spot"] is False
    assert body["error_type"] == "" and body["pods"][0]["spot"] is False
    job.refresh_from_db()
    assert job.executor_ref in sleepers.pods and not sleepers.pods[job.executor_ref].spot
    assert job.launch_retry_at is None
    assert job.warnings[-1]["code"] == "switched_to_on_demand"


def test_switching_a_job_that_failed_for_capacity_starts_an_on_demand_copy(
    sleepers, inline_commit, training_file, smollm, smoke, api_as
):
    job = make_job(training_file, smollm, smoke, spot=True, start=False)
    TrainingJob.objects.filter(pk=job.pk).update(
        status=JobStatus.FAILED, error_type="GPUProvisioningError"
    )
    response = api_as(Role.ENGINEER).post(f"training/jobs/{job.pk}/switch-to-on-demand")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["retry_of_id"] == str(job.pk) and body["spot"] is False
    assert body["status"] == "provisioning" and body["pods"][0]["spot"] is False


def test_switch_to_on_demand_refusals_write_nothing(
    sleepers, inline_commit, training_file, smollm, smoke, api_as, anon_api
):
    engineer = api_as(Role.ENGINEER)
    local = services.training_job_create(
        user=None, training_file=training_file, base_model=smollm, preset=smoke, name="l"
    )
    assert_envelope(engineer.post(f"training/jobs/{local.pk}/switch-to-on-demand"), 409, "conflict")
    on_demand = make_job(training_file, smollm, smoke, spot=False, start=False)
    error = assert_envelope(
        engineer.post(f"training/jobs/{on_demand.pk}/switch-to-on-demand"), 409, "conflict"
    )
    assert "already" in error["message"]
    spot = make_job(training_file, smollm, smoke, spot=True, start=False)
    assert_envelope(api_as(Role.VIEWER).post(f"training/jobs/{spot.pk}/switch-to-on-demand"), 403)
    assert_envelope(anon_api.post(f"training/jobs/{spot.pk}/switch-to-on-demand"), 401)
    assert TrainingJob.objects.get(pk=spot.pk).spot is True
    assert TrainingJob.objects.get(pk=local.pk).warnings == []


def test_a_running_spot_job_switched_to_on_demand_relaunches_on_demand(
    sleepers, inline_commit, training_file, smollm, smoke
):
    job = training(make_job(training_file, smollm, smoke, spot=True))
    assert sleepers.pods[job.executor_ref].spot
    job = services.training_job_switch_to_on_demand(job=job, user=None)
    assert job.spot is False and job.status == JobStatus.TRAINING  # this pod keeps running
    sleepers.preempt(job.executor_ref)
    services.training_jobs_reconcile()
    job.refresh_from_db()
    assert not sleepers.pods[job.executor_ref].spot


def test_a_transient_api_failure_at_launch_is_retried_not_failed(
    sleepers, inline_commit, training_file, smollm, smoke
):
    sleepers.fail_next(20)
    job = make_job(training_file, smollm, smoke, spot=True)
    assert job.status == JobStatus.PROVISIONING and job.waiting_for_capacity
    assert job.error_type == "NetworkError"
    sleepers._failures.clear()
    TrainingJob.objects.filter(pk=job.pk).update(launch_retry_at=timezone.now())
    services.training_jobs_reconcile()
    job.refresh_from_db()
    assert job.executor_ref in sleepers.pods and job.error_type == "" and job.attempt == 1


def test_a_refused_api_key_fails_the_launch_with_a_clear_message(
    sleepers, inline_commit, training_file, smollm, smoke, settings
):
    settings.RUNPOD_API_KEY = "wrong"
    job = make_job(training_file, smollm, smoke)
    assert job.status == JobStatus.FAILED and job.error_type == "WorkerError"
    assert "RunPod refused the API key" in job.error_message
    assert not sleepers.pods


def test_cancel_stops_and_terminates_the_pod(
    sleepers, inline_commit, training_file, smollm, smoke, api_as
):
    job = training(make_job(training_file, smollm, smoke))
    ref = job.executor_ref
    response = api_as(Role.ENGINEER).post(f"training/jobs/{job.pk}/cancel")
    assert response.json()["status"] == "cancelled"
    assert ref not in sleepers.pods and ref in sleepers.terminated
    assert TrainingPod.objects.get(pod_id=ref).state == TrainingPod.State.TERMINATED


def test_a_pod_that_could_not_be_terminated_is_terminated_at_the_next_reconcile(
    sleepers, inline_commit, training_file, smollm, smoke
):
    job = training(make_job(training_file, smollm, smoke))
    ref = job.executor_ref
    sleepers.fail_next(20)  # RunPod down while the job completes
    TrainingJob.objects.filter(pk=job.pk).update(status=JobStatus.FINALIZATION)
    job.refresh_from_db()
    services._transition(job, JobStatus.COMPLETED, reason="test")
    assert ref in sleepers.pods
    sleepers._failures.clear()
    assert services.training_jobs_reconcile()["pods_released"] == 1
    assert ref not in sleepers.pods
    assert TrainingPod.objects.get(pod_id=ref).terminated_at is not None


def test_the_sweep_terminates_orphan_pods_and_leaves_everything_else(
    sleepers, inline_commit, training_file, smollm, smoke
):
    job = make_job(training_file, smollm, smoke)
    orphan = sleepers.add_pod(name="crucible-00000000-0000-4000-8000-000000000000-a1")
    lost = sleepers.add_pod(name=f"crucible-{job.pk}-a7")  # an earlier launch's lost answer
    foreign = sleepers.add_pod(name="someones-notebook")
    summary = services.runpod_pods_sweep()
    assert sorted(summary["terminated"]) == sorted([orphan, lost])
    assert set(sleepers.pods) == {job.executor_ref, foreign}


def test_gpu_prices_refresh_the_billing_catalogue(sleepers, db):
    from billing.services import gpu_prices_refresh

    assert gpu_prices_refresh() >= 1
    h100 = GpuPrice.objects.get(gpu_type="h100-pcie-80gb")
    assert (h100.spot_per_hour, h100.on_demand_per_hour) == (Decimal("1.25"), Decimal("2.39"))
    assert h100.source == "RunPod API"
    a100 = GpuPrice.objects.get(gpu_type="a100-pcie-80gb")
    assert a100.on_demand_per_hour == Decimal("1.64")


def test_readyz_reports_runpod_without_calling_it(loopback, db, settings):
    from config.health import providers

    before = len(loopback.requests)
    body = Client().get("/readyz").json()
    assert body["providers"]["runpod"]["configured"] is True
    runpod_executor.gpu_types(refresh=True)
    assert "last call (GPU types) ok" in providers()["runpod"]["detail"]
    assert len(loopback.requests) == before + 1  # only the call made above
    settings.RUNPOD_API_KEY = ""
    assert providers()["runpod"] == {
        "configured": False,
        "detail": "not configured (RUNPOD_API_KEY unset): local executor only",
    }


def test_a_launch_that_died_before_storing_its_pod_is_tried_again(
    sleepers, inline_commit, training_file, smollm, smoke, settings
):
    job = make_job(training_file, smollm, smoke, start=False)
    TrainingJob.objects.filter(pk=job.pk).update(
        status=JobStatus.PROVISIONING,
        attempt=1,
        updated_at=timezone.now() - timedelta(seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_S + 1),
    )
    lost = sleepers.add_pod(name=f"crucible-{job.pk}-a1")  # created, but never stored
    services.training_jobs_reconcile()
    job.refresh_from_db()
    assert job.executor_ref in sleepers.pods and job.executor_ref != lost
    assert services.runpod_pods_sweep()["terminated"] == [lost]


def test_a_spot_pod_with_a_network_volume_runs_in_the_volume_s_data_centre(
    sleepers, inline_commit, training_file, smollm, smoke, settings
):
    settings.RUNPOD_NETWORK_VOLUME_ID = "loopback-volume"
    job = make_job(training_file, smollm, smoke, spot=True)
    mutation = next(r["query"] for r in sleepers.requests if "podRentInterruptable" in r["query"])
    assert 'networkVolumeId: "loopback-volume"' in mutation
    assert 'dataCenterId: "LB-1"' in mutation and "volumeInGb: 0" in mutation
    assert job.executor_ref in sleepers.pods
