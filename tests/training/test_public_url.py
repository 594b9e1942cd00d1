"""The webhook address is right by construction (issue 12): derived from where the web server
answers, probed before a local launch, refused for RunPod when private, and a worker whose
reports cannot be delivered fails with a typed error instead of a recovery loop."""

import logging
import socket
import time
from datetime import timedelta
from urllib.parse import urlparse

import pytest
import requests
from django.utils import timezone

from config import addresses
from gpu.webhooks import UNREACHABLE_MARK, WebhookEmitter
from training import services
from training.executors import ExecutorState
from training.executors.local import LocalExecutor
from training.models import JobStatus, Recovery, TrainingJob

S = JobStatus


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    monkeypatch.setattr(addresses, "_noted", {})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_job(training_file, smollm, smoke, **fields) -> TrainingJob:
    job = services.training_job_create(
        user=None, training_file=training_file, base_model=smollm, preset=smoke, name="j"
    )
    if fields:
        TrainingJob.objects.filter(pk=job.pk).update(**fields)
    return TrainingJob.objects.get(pk=job.pk)


# --- The address ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_request_notes_the_loopback_address_of_its_socket_not_the_test_client(settings):
    settings.CRUCIBLE_PUBLIC_URL = ""
    addresses.note_served_address({"SERVER_NAME": "testserver", "SERVER_PORT": "80"})
    assert addresses.served_addresses() == []
    # A worker's webhook (e.g. to the `train` command's temporary receiver) is not noted.
    addresses.note_served_address(
        {"SERVER_NAME": "x", "SERVER_PORT": "41234", "PATH_INFO": "/api/v1/training/webhook"}
    )
    assert addresses.served_addresses() == []
    addresses.note_served_address(
        {"SERVER_NAME": "box.lan", "SERVER_PORT": "9123", "wsgi.url_scheme": "http"}
    )
    assert addresses.served_addresses()[0] == "http://127.0.0.1:9123"
    assert addresses.public_base_url() == "http://127.0.0.1:9123"
    assert addresses.absolute_url("/budgets/") == "http://127.0.0.1:9123/budgets/"


@pytest.mark.django_db
def test_crucible_public_url_wins_when_set(settings):
    addresses.note_served_address({"SERVER_NAME": "box", "SERVER_PORT": "9123"})
    settings.CRUCIBLE_PUBLIC_URL = "https://crucible.example.com/"
    assert addresses.public_base_url() == "https://crucible.example.com"
    assert (
        services.training_webhook_url(executor="runpod")
        == "https://crucible.example.com/api/v1/training/webhook"
    )


@pytest.mark.django_db(transaction=True)
def test_a_local_worker_gets_the_address_a_live_server_answers_on(live_server, settings):
    """A server on a random port, CRUCIBLE_PUBLIC_URL not set: one request to it is enough."""
    settings.CRUCIBLE_PUBLIC_URL = ""
    assert requests.get(live_server.url + "/healthz", timeout=5).status_code == 200
    port = urlparse(live_server.url).port
    assert addresses.served_addresses()[0] == f"http://127.0.0.1:{port}"
    assert (
        services.training_webhook_url(executor="local")
        == f"http://127.0.0.1:{port}/api/v1/training/webhook"
    )


@pytest.mark.parametrize(
    "url,private",
    [
        ("http://127.0.0.1:8000", True),
        ("http://localhost:8000", True),
        ("http://[::1]:8000", True),
        ("http://10.1.2.3", True),
        ("http://192.168.1.20:9000", True),
        ("http://169.254.1.1", True),
        ("https://93.184.216.34", False),
    ],
)
def test_private_addresses(url, private):
    assert addresses.is_private_address(url) is private


# --- Launch refusals --------------------------------------------------------------------------


@pytest.fixture
def inline(monkeypatch, settings):
    settings.TRAINING_LAUNCH_INLINE = True
    monkeypatch.setattr("django.db.transaction.on_commit", lambda fn, *a, **k: fn())


@pytest.mark.django_db
def test_a_local_launch_that_nothing_would_hear_fails_with_a_typed_error(
    inline, settings, training_file, smollm, smoke, monkeypatch
):
    settings.CRUCIBLE_PUBLIC_URL = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = []
    monkeypatch.setattr(
        "training.executors.local.subprocess.Popen", lambda *a, **k: started.append(a)
    )
    job = make_job(training_file, smollm, smoke)
    services.training_job_start(job=job, user=None)
    job.refresh_from_db()
    assert job.status == S.FAILED and job.error_type == "PlatformUnreachableError"
    assert settings.CRUCIBLE_PUBLIC_URL in job.error_message
    assert "CRUCIBLE_PUBLIC_URL" in job.error_details["fix"]
    assert "make demo PORT=" in job.error_details["fix"]
    assert started == [] and job.executor_ref == "" and job.recovery_count == 0


@pytest.mark.django_db
def test_a_runpod_launch_to_a_loopback_address_is_refused(
    inline, settings, training_file, smollm, smoke, monkeypatch
):
    settings.CRUCIBLE_PUBLIC_URL = ""  # falls back to a loopback address
    settings.RUNPOD_API_KEY = "test-key"
    settings.RUNPOD_API_BASE_URL = ""  # the real RunPod: its pods are elsewhere
    monkeypatch.setattr(
        "training.executors.runpod.resolve_gpu_type",
        lambda name: pytest.fail("RunPod must not be asked for a pod"),
    )
    job = make_job(training_file, smollm, smoke, executor=TrainingJob.Executor.RUNPOD)
    services.training_job_start(job=job, user=None)
    job.refresh_from_db()
    assert job.status == S.FAILED and job.error_type == "PlatformAddressError"
    assert "CRUCIBLE_PUBLIC_URL is not set" in job.error_message
    assert "public" in job.error_details["fix"] and job.error_details["url"].startswith(
        "http://127.0.0.1"
    )
    # A private address set explicitly is refused too.
    settings.CRUCIBLE_PUBLIC_URL = "http://192.168.1.20:8000"
    job = make_job(training_file, smollm, smoke, executor=TrainingJob.Executor.RUNPOD)
    services.training_job_start(job=job, user=None)
    job.refresh_from_db()
    assert job.error_type == "PlatformAddressError" and "192.168.1.20" in job.error_message
    assert not job.pods.exists()


# --- Alive but unheard ------------------------------------------------------------------------


@pytest.mark.django_db
def test_an_unheard_live_worker_fails_with_webhook_delivery_error_not_a_recovery(
    fake_executor, training_file, smollm, smoke
):
    fake_executor.delivery_problem = lambda *, job_id, attempt: (
        "3 event(s) spooled (http://127.0.0.1:8000/api/v1/training/webhook: Connection refused)"
    )
    job = make_job(training_file, smollm, smoke)
    services.training_job_start(job=job, user=None)
    TrainingJob.objects.filter(pk=job.pk).update(
        last_heartbeat_at=timezone.now() - timedelta(minutes=10)
    )
    summary = services.training_jobs_reconcile()
    job.refresh_from_db()
    assert summary["undeliverable"] == 1 and summary["recovered"] == 0
    assert job.status == S.FAILED and job.error_type == "WebhookDeliveryError"
    assert "Connection refused" in job.error_message
    assert "CRUCIBLE_PUBLIC_URL" in job.error_details["fix"]
    assert job.recovery_count == 0 and not Recovery.objects.filter(job=job).exists()
    assert len(fake_executor.launched) == 1  # never relaunched
    assert fake_executor.cancelled == [(job.executor_ref, True)]  # the worker was stopped


@pytest.mark.django_db
def test_an_exited_worker_that_never_reported_is_a_delivery_error_one_that_did_is_recovered(
    fake_executor, training_file, smollm, smoke
):
    fake_executor.delivery_problem = lambda *, job_id, attempt: "1 event(s) spooled (refused)"
    fake_executor.state = ExecutorState.EXITED
    fake_executor.exit_code = 0
    unheard = make_job(training_file, smollm, smoke)
    services.training_job_start(job=unheard, user=None)
    services.training_jobs_reconcile()
    unheard.refresh_from_db()
    assert unheard.error_type == "WebhookDeliveryError" and unheard.recovery_count == 0

    heard = make_job(training_file, smollm, smoke)
    services.training_job_start(job=heard, user=None)
    TrainingJob.objects.filter(pk=heard.pk).update(last_event_at=timezone.now())
    fake_executor.state = ExecutorState.EXITED
    services.training_jobs_reconcile(job_ids=[heard.pk])
    heard.refresh_from_db()
    assert heard.recovery_count == 1  # it was heard before: a crash, resumed as before


def test_the_local_executor_reads_undelivered_events_from_the_worker_log(settings, tmp_path):
    """The real emitter, pointed at a closed port, logs what the executor looks for."""
    settings.DATA_DIR = tmp_path
    job_id = "0b9d4c1e-0000-4000-8000-000000000001"
    folder = tmp_path / "jobs" / job_id
    folder.mkdir(parents=True)
    handler = logging.FileHandler(folder / "worker-1.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    worker_log = logging.getLogger("crucible.worker.webhooks")
    worker_log.addHandler(handler)
    url = f"http://127.0.0.1:{free_port()}/api/v1/training/webhook"
    emitter = WebhookEmitter(
        job_id,
        url,
        "secret",
        folder / "events.spool.jsonl",
        max_attempts=1,
        idle_retry=30,
        timeout=1,
    )
    try:
        emitter.emit("started", {})
        deadline = time.monotonic() + 10
        while UNREACHABLE_MARK not in (folder / "worker-1.log").read_text():
            assert time.monotonic() < deadline, "the emitter never logged the failure"
            time.sleep(0.05)
    finally:
        emitter.close(timeout=0)
        worker_log.removeHandler(handler)
        handler.close()
    problem = LocalExecutor().delivery_problem(job_id=job_id, attempt=1)
    assert "1 event(s) spooled" in problem and url in problem, problem
    assert (folder / "events.spool.jsonl").exists()
    # Delivered again later: no problem any more.
    with (folder / "worker-1.log").open("a") as log:
        log.write("INFO crucible.worker.webhooks: platform reachable again; flushing 1\n")
    assert LocalExecutor().delivery_problem(job_id=job_id, attempt=1) == ""
    # Another installation answering at the address refuses the unknown job.
    with (folder / "worker-1.log").open("a") as log:
        log.write("ERROR crucible.worker.webhooks: webhook rejected an event with HTTP 401: x\n")
    assert "refused the events" in LocalExecutor().delivery_problem(job_id=job_id, attempt=1)
