"""Interruptions: a worker that dies without completing is relaunched from its checkpoint."""

from datetime import timedelta

import pytest
from django.utils import timezone

from training import services
from training.executors import ExecutorState
from training.models import Checkpoint, JobStatus, TrainingJob


@pytest.fixture
def training_job(training_file, smollm, smoke, fake_executor):
    job = services.training_job_create(
        user=None, training_file=training_file, base_model=smollm, preset=smoke, name="j"
    )
    services.training_job_start(job=job, user=None)
    TrainingJob.objects.filter(pk=job.pk).update(status=JobStatus.TRAINING)
    Checkpoint.objects.create(job=job, step=8, uri="u", manifest_uri="m")
    return TrainingJob.objects.get(pk=job.pk)


def test_a_dead_worker_is_recovered_from_its_checkpoint(training_job, fake_executor):
    fake_executor.state = ExecutorState.EXITED
    fake_executor.exit_code = -9
    summary = services.training_jobs_reconcile()
    assert summary["recovered"] == 1
    job = TrainingJob.objects.get(pk=training_job.pk)
    # Relaunched at once (eager Celery in tests): provisioning again, attempt 2.
    assert job.status == JobStatus.PROVISIONING
    assert job.recovery_count == 1 and job.attempt == 2
    assert job.recovery_summary == "Interrupted 1x, resumed successfully"
    recovery = job.recoveries.get()
    assert recovery.from_step == 8 and recovery.relaunch_seconds is not None
    assert fake_executor.launched[-1]["spec"]["resume"] is True


def test_a_running_worker_is_left_alone(training_job, fake_executor):
    assert services.training_jobs_reconcile()["recovered"] == 0
    assert TrainingJob.objects.get(pk=training_job.pk).status == JobStatus.TRAINING


def test_silence_past_the_heartbeat_timeout_is_an_interruption(
    training_job, fake_executor, settings
):
    TrainingJob.objects.filter(pk=training_job.pk).update(
        last_heartbeat_at=timezone.now()
        - timedelta(seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_S + 5)
    )
    services.training_jobs_reconcile()
    job = TrainingJob.objects.get(pk=training_job.pk)
    assert job.recovery_count == 1
    assert "no heartbeat" in job.recoveries.get().reason
    assert fake_executor.cancelled[-1][1] is True  # the hung worker was killed first


def test_too_many_interruptions_fail_the_job(training_job, fake_executor, settings):
    settings.TRAINING_MAX_RECOVERIES = 1
    fake_executor.state = ExecutorState.EXITED
    services.training_jobs_reconcile()  # first: recovered
    TrainingJob.objects.filter(pk=training_job.pk).update(status=JobStatus.TRAINING)
    services.training_jobs_reconcile()  # second: over the limit
    job = TrainingJob.objects.get(pk=training_job.pk)
    assert job.status == JobStatus.FAILED and job.error_type == "InterruptionLimitError"


def test_an_exit_code_without_an_event_is_classified(training_job, fake_executor):
    fake_executor.state = ExecutorState.EXITED
    fake_executor.exit_code = 3
    services.training_jobs_reconcile()
    job = TrainingJob.objects.get(pk=training_job.pk)
    assert job.status == JobStatus.FAILED and job.error_type == "OutOfMemoryError"


def test_provider_outage_is_neither_failure_nor_interruption(training_job, fake_executor):
    fake_executor.state = ExecutorState.UNKNOWN
    services.training_jobs_reconcile()
    job = TrainingJob.objects.get(pk=training_job.pk)
    assert job.status == JobStatus.TRAINING and job.recovery_count == 0
