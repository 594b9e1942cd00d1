"""Acceptance (issue 12): the platform serves on a random port, CRUCIBLE_PUBLIC_URL is not set,
and a Smoke job started through the API over HTTP reaches completed without any recovery.

Real training on CPU (about two minutes): run it alone.
"""

import json
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests

from config import addresses
from config.roles import Role
from tests.factories import TokenFactory, UserFactory
from tests.training.test_end_to_end import SAMPLE, wait_for
from training.models import JobStatus, Recovery, WebhookEvent

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_a_job_on_a_server_at_a_random_port_completes_with_no_recovery(
    live_server, settings, monkeypatch
):
    settings.CRUCIBLE_PUBLIC_URL = ""  # nothing tells the platform its address
    settings.TRAINING_LAUNCH_INLINE = True
    settings.RATELIMIT_ENABLE = False
    settings.TRAINING_MODEL_CACHE = str(ROOT / "var" / "models")
    monkeypatch.setattr(addresses, "_noted", {})
    port = urlparse(live_server.url).port
    assert port != 8000
    token = TokenFactory(user=UserFactory(role=Role.ENGINEER))
    headers = {"Authorization": f"Token {token.key}"}
    api = f"{live_server.url}/api/v1"

    uploaded = requests.post(
        f"{api}/training-files",
        files={"file": ("sample.jsonl", SAMPLE.read_bytes())},
        data={"name": "sample"},
        headers=headers,
        timeout=60,
    )
    assert uploaded.status_code == 201, uploaded.text
    created = requests.post(
        f"{api}/training/jobs",
        json={
            "training_file_id": uploaded.json()["id"],
            "preset": "smoke",
            "name": "Any port",
            "start": True,
        },
        headers=headers,
        timeout=120,
    )
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    # Generous: on a shared two-core machine the two-minute Smoke run can take 15 minutes.
    job = wait_for(job_id, lambda j: j.is_terminal, timeout=2400)
    assert job.status == JobStatus.COMPLETED, (job.error_type, job.error_message)
    assert job.recovery_count == 0 and job.attempt == 1
    assert not Recovery.objects.filter(job=job).exists()
    assert "recovering" not in [t.to_status for t in job.transitions.all()]
    # The worker was told the live server's own port, and its events arrived there.
    spec = json.loads((Path(settings.DATA_DIR) / "jobs" / job_id / "spec-1.json").read_text())
    assert spec["webhook"]["url"] == f"http://127.0.0.1:{port}/api/v1/training/webhook"
    assert WebhookEvent.objects.filter(job=job, type="completed").exists()
    # The job's page shows one validation loss, labelled with its step.
    assert job.final_val_loss == job.latest_metrics["val_loss"]
    assert job.latest_metrics["val_loss_step"] <= job.current_step
