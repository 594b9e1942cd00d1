"""The worker's webhooks: signatures, replays, and how each event moves the job."""

import time
import uuid

import pytest

from tests.conftest import assert_envelope
from tests.training.conftest import signed_event
from training import services
from training.models import Checkpoint, JobStatus, MetricPoint, TrainingJob, WebhookEvent


@pytest.fixture
def running_job(training_file, smollm, smoke, fake_executor):
    job = services.training_job_create(
        user=None, training_file=training_file, base_model=smollm, preset=smoke, name="j"
    )
    services.training_job_start(job=job, user=None)
    job.refresh_from_db()
    assert job.status == JobStatus.PROVISIONING
    return job


def test_a_signed_event_is_stored_and_processed(running_job, post_event):
    response = post_event(running_job, "stage", {"stage": "preprocessing"})
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "stored"
    event = WebhookEvent.objects.get()
    assert event.processed and event.processing_error == ""
    running_job.refresh_from_db()
    assert running_job.status == JobStatus.PREPROCESSING
    assert running_job.last_heartbeat_at is not None


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"secret": "not-the-jobs-secret"}, "does not match"),
        ({"ts": time.time() - 3600}, "older than"),
    ],
)
def test_forged_or_stale_events_get_401_and_write_nothing(running_job, client, kwargs, reason):
    body, headers = signed_event(running_job, "error", {"error_type": "WorkerError"}, **kwargs)
    response = client.post(
        "/api/v1/training/webhook", data=body, content_type="application/json", headers=headers
    )
    error = assert_envelope(response, 401, "bad_signature")
    assert reason in error["message"]
    assert WebhookEvent.objects.count() == 0
    running_job.refresh_from_db()
    assert running_job.status == JobStatus.PROVISIONING


def test_tampered_body_is_refused(running_job, client):
    body, headers = signed_event(running_job, "stage", {"stage": "training"})
    tampered = body.replace(b"training", b"finalization")
    response = client.post(
        "/api/v1/training/webhook", data=tampered, content_type="application/json", headers=headers
    )
    assert_envelope(response, 401)
    assert WebhookEvent.objects.count() == 0


def test_unknown_job_and_missing_signature_are_401(running_job, client):
    body, headers = signed_event(running_job, "heartbeat")
    body = body.replace(str(running_job.pk).encode(), str(uuid.uuid4()).encode())
    assert_envelope(
        client.post(
            "/api/v1/training/webhook", data=body, content_type="application/json", headers=headers
        ),
        401,
    )
    assert_envelope(
        client.post("/api/v1/training/webhook", data=b"{}", content_type="application/json"), 401
    )
    assert WebhookEvent.objects.count() == 0


def test_a_repeated_event_id_is_processed_once(running_job, post_event):
    event_id = uuid.uuid4()
    first = post_event(
        running_job, "metrics", {"step": 3, "train_loss": 2.0, "total_steps": 24}, event_id=event_id
    )
    again = post_event(
        running_job, "metrics", {"step": 3, "train_loss": 2.0, "total_steps": 24}, event_id=event_id
    )
    assert first.json()["status"] == "stored" and again.json()["status"] == "duplicate"
    assert WebhookEvent.objects.count() == 1 and MetricPoint.objects.count() == 1


def test_a_full_run_of_events(running_job, post_event, settings, tmp_path):
    from config.storage import storage_save, storage_uri

    for stage in ("preprocessing", "model_loading"):
        post_event(running_job, "stage", {"stage": stage})
    post_event(
        running_job, "dataset", {"conversations": 6, "total_steps": 24, "truncated_examples": 0}
    )
    post_event(running_job, "stage", {"stage": "training"})
    for step in (1, 2, 3):
        post_event(
            running_job,
            "metrics",
            {
                "step": step,
                "total_steps": 24,
                "epoch": step / 24,
                "train_loss": 3.0 - step / 10,
                "learning_rate": 1e-3,
                "tokens_per_second": 900.0,
                "eta_seconds": 60,
            },
        )
    post_event(running_job, "metrics", {"step": 3, "val_loss": 2.5})
    post_event(
        running_job,
        "checkpoint",
        {
            "step": 8,
            "uri": "file:///x/step-000008",
            "manifest_uri": "file:///x/step-000008/manifest.json",
            "size_bytes": 1234,
        },
    )
    running_job.refresh_from_db()
    assert running_job.status == JobStatus.TRAINING
    assert running_job.current_step == 3 and running_job.progress == pytest.approx(12.5)
    assert MetricPoint.objects.get(job=running_job, step=3).val_loss == 2.5
    assert MetricPoint.objects.get(job=running_job, step=3).train_loss == pytest.approx(2.7)
    assert Checkpoint.objects.get(job=running_job).step == 8

    out = f"training/jobs/{running_job.pk}"
    storage_save(f"{out}/adapter/adapter_config.json", b"{}")
    storage_save(f"{out}/metrics/history.json", b"[]")
    post_event(running_job, "stage", {"stage": "finalization"})
    post_event(
        running_job,
        "completed",
        {
            "artifacts": {
                "adapter_uri": storage_uri(f"{out}/adapter"),
                "metrics_json_uri": storage_uri(f"{out}/metrics/history.json"),
            },
            "final_metrics": {"global_step": 24, "train_loss": 1.9, "val_loss": 2.1},
            "perplexity": {
                "baseline": 24.5,
                "trained": 16.8,
                "improvement_pct": 31.4,
                "method": "token-level",
            },
        },
    )
    job = TrainingJob.objects.get(pk=running_job.pk)
    assert job.status == JobStatus.COMPLETED and job.progress == 100
    assert job.perplexity_improvement_pct == pytest.approx(31.43, abs=0.01)
    assert set(job.artifacts.values_list("kind", flat=True)) == {"adapter", "metrics_json"}
    statuses = list(job.transitions.values_list("to_status", flat=True))
    assert statuses == [
        "queued",
        "provisioning",
        "preprocessing",
        "model_loading",
        "training",
        "finalization",
        "completed",
    ]
    # A late event for a finished job is kept but changes nothing.
    post_event(job, "stage", {"stage": "training"})
    assert TrainingJob.objects.get(pk=job.pk).status == JobStatus.COMPLETED
    assert "cannot become" in WebhookEvent.objects.last().processing_error


def test_an_error_event_fails_the_job_with_a_typed_message(running_job, post_event):
    post_event(running_job, "stage", {"stage": "preprocessing"})
    post_event(
        running_job,
        "error",
        {
            "error_type": "DatasetFormatError",
            "message": "Row 47 (conversation conv-047): training_pairs[2].target_response is missing or empty",
            "traceback": "Traceback ...",
            "details": {
                "row": 47,
                "conversation_id": "conv-047",
                "field": "training_pairs[2].target_response",
            },
        },
    )
    job = TrainingJob.objects.get(pk=running_job.pk)
    assert job.status == JobStatus.FAILED
    assert job.error_type == "DatasetFormatError"
    assert "Row 47" in job.error_message
    assert job.error_details["row"] == 47 and job.error_details["retryable"] is False
    assert "Fix that row" in job.error_details["fix"]


def test_oom_gives_a_retry_with_a_smaller_micro_batch(running_job, post_event, engineer):
    post_event(
        running_job,
        "error",
        {
            "error_type": "OutOfMemoryError",
            "message": "CUDA out of memory",
            "details": {
                "micro_batch_size": 2,
                "gradient_accumulation_steps": 1,
                "max_seq_length": 512,
            },
        },
    )
    job = TrainingJob.objects.get(pk=running_job.pk)
    assert job.error_type == "OutOfMemoryError"
    assert "micro_batch_size=1" in job.error_details["fix"]
    assert job.error_details["suggested_changes"] == {
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 2,
    }
    response = engineer.post(f"training/jobs/{job.pk}/retry")
    assert response.status_code == 201, response.content
    retry = response.json()
    assert retry["retry_of_id"] == str(job.pk)
    assert retry["retry_changes"] == [
        {"field": "gradient_accumulation_steps", "old": 1, "new": 2},
        {"field": "micro_batch_size", "old": 2, "new": 1},
    ]
    assert retry["configuration"]["hyperparameters"]["micro_batch_size"] == 1
    assert retry["status"] == "provisioning"  # retried with one click: started


def test_only_failed_or_cancelled_jobs_retry(running_job, engineer):
    assert_envelope(engineer.post(f"training/jobs/{running_job.pk}/retry"), 409)


def test_unknown_job_and_bad_signature_get_the_same_401_body(running_job, client):
    """No oracle: without the job's secret, a caller cannot tell whether the job exists."""

    def post(body: bytes, headers: dict) -> dict:
        response = client.post(
            "/api/v1/training/webhook", data=body, content_type="application/json", headers=headers
        )
        error = assert_envelope(response, 401, "bad_signature")
        error.pop("request_id", None)
        return error

    forged_body, forged_headers = signed_event(running_job, "heartbeat", secret="guessed")
    unknown_body, unknown_headers = signed_event(running_job, "heartbeat", secret="guessed")
    unknown_body = unknown_body.replace(str(running_job.pk).encode(), str(uuid.uuid4()).encode())
    forged, unknown = post(forged_body, forged_headers), post(unknown_body, unknown_headers)
    assert forged == unknown
    assert forged["message"] == "Webhook refused: the signature does not match."
    # Stale or unsigned: the reason depends on what was sent, never on the job's existence.
    stale = signed_event(running_job, "heartbeat", ts=time.time() - 3600)
    stale_unknown = (stale[0].replace(str(running_job.pk).encode(), b"not-a-job"), stale[1])
    assert post(*stale) == post(*stale_unknown)
    assert WebhookEvent.objects.count() == 0
