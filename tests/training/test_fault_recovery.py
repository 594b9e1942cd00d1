"""The product fixes behind the fault-injection tests (tests/config/test_faults.py), in process:

- an event stored just before the database went away is processed when the worker resends it;
- a launch lost with the broker's queue (Redis restarted without persistence) is enqueued
  again by the reconcile, once;
- a checkpoint whose upload keeps failing is retried, then skipped with no manifest.
"""

from __future__ import annotations

import json
from datetime import timedelta
from unittest import mock

import pytest
from django.db import OperationalError
from django.utils import timezone

from gpu import checkpoints
from gpu.storage import LocalStorage
from training import services
from training.models import JobStatus, MetricPoint, TrainingJob, WebhookEvent


@pytest.fixture
def training_job(training_file, smollm, smoke, fake_executor):
    job = services.training_job_create(
        user=None, training_file=training_file, base_model=smollm, preset=smoke, name="j"
    )
    services.training_job_start(job=job, user=None)
    TrainingJob.objects.filter(pk=job.pk).update(status=JobStatus.TRAINING)
    return TrainingJob.objects.get(pk=job.pk)


def test_an_event_stored_before_the_database_went_away_is_processed_on_resend(
    training_job, post_event, monkeypatch
):
    event_id = "5b0c1f9e-8a35-4c2e-9d49-0d2f3a1d7e11"
    handle = services._HANDLERS["metrics"]
    down = mock.Mock(side_effect=OperationalError("server closed the connection unexpectedly"))
    monkeypatch.setitem(services._HANDLERS, "metrics", down)
    failed = post_event(training_job, "metrics", {"step": 3, "train_loss": 1.5}, event_id=event_id)
    assert failed.status_code == 500  # a 5xx: the worker keeps the event and sends it again
    stored = WebhookEvent.objects.get(event_id=event_id)
    assert not stored.processed  # not acknowledged as applied: the worker sends it again

    monkeypatch.setitem(services._HANDLERS, "metrics", handle)
    response = post_event(
        training_job, "metrics", {"step": 3, "train_loss": 1.5}, event_id=event_id
    )
    assert response.status_code == 200 and response.json()["status"] == "duplicate"
    stored.refresh_from_db()
    assert stored.processed and stored.processing_error == ""
    assert MetricPoint.objects.filter(job=training_job, step=3).count() == 1
    # A third copy changes nothing.
    post_event(training_job, "metrics", {"step": 3, "train_loss": 1.5}, event_id=event_id)
    assert MetricPoint.objects.filter(job=training_job, step=3).count() == 1


def test_a_lost_launch_is_enqueued_again_once(
    training_file, smollm, smoke, fake_executor, settings, monkeypatch
):
    from training import tasks

    job = services.training_job_create(
        user=None, training_file=training_file, base_model=smollm, preset=smoke, name="lost"
    )
    monkeypatch.setattr(tasks.launch_training_job, "delay", lambda job_id: None)  # lost
    services.training_job_start(job=job, user=None)
    settings.TRAINING_LAUNCH_REQUEUE_S = 60
    assert services.training_jobs_reconcile()["launches_requeued"] == 0  # not yet overdue
    TrainingJob.objects.filter(pk=job.pk).update(updated_at=timezone.now() - timedelta(minutes=2))
    launched = []
    monkeypatch.setattr(tasks.launch_training_job, "delay", launched.append)
    assert services.training_jobs_reconcile()["launches_requeued"] == 1
    assert launched == [str(job.pk)]
    # The next reconcile waits another interval before trying again.
    assert services.training_jobs_reconcile()["launches_requeued"] == 0
    services.training_job_launch(job_id=launched[0])
    services.training_job_launch(job_id=launched[0])  # a late original message: no second launch
    assert len(fake_executor.launched) == 1
    assert TrainingJob.objects.get(pk=job.pk).attempt == 1


class FailingStorage(LocalStorage):
    def __init__(self, root, failures: int):
        super().__init__(root)
        self.failures = failures

    def put_file(self, local, rel):
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("Could not connect to the endpoint URL")
        return super().put_file(local, rel)


def _checkpoint_dir(tmp_path):
    local = tmp_path / "checkpoint-2"
    local.mkdir()
    (local / "trainer_state.json").write_text("{}")
    (local / "adapter_model.safetensors").write_bytes(b"w" * 64)
    return local


def test_a_checkpoint_upload_is_retried_until_the_storage_answers(tmp_path):
    storage = FailingStorage(tmp_path / "out", failures=3)
    slept = []
    published, problem = checkpoints.publish_checkpoint_retrying(
        storage, _checkpoint_dir(tmp_path), 2, deadline_s=60, sleep=slept.append
    )
    assert problem == "" and published["step"] == 2
    assert slept == [1.0, 2.0, 4.0]
    manifest = json.loads((tmp_path / "out" / "checkpoints/step-000002/manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} == {
        "trainer_state.json",
        "adapter_model.safetensors",
    }


def test_a_checkpoint_the_storage_keeps_refusing_is_skipped_without_a_manifest(tmp_path):
    storage = FailingStorage(tmp_path / "out", failures=1000)
    published, problem = checkpoints.publish_checkpoint_retrying(
        storage, _checkpoint_dir(tmp_path), 2, deadline_s=0, sleep=lambda s: None
    )
    assert published is None and "Could not connect" in problem
    assert checkpoints.fetch_latest_complete(storage, tmp_path / "work") is None
    assert not (tmp_path / "out" / "checkpoints/step-000002/manifest.json").exists()
