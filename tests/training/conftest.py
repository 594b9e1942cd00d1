import io
import json
import time
import uuid

import pytest

from config.roles import Role
from corpora.services import training_file_create
from training.executors import ExecutorState, ExecutorStatus
from training.models import BaseModel, Preset
from training.webhooks import sign

SYSTEM = "You are Elena Morales, a warm and emotionally intelligent financial advisor."


def conversations(n: int = 6) -> bytes:
    lines = []
    for i in range(n):
        lines.append(
            {
                "id": f"t-{i}",
                "system_prompt": SYSTEM,
                "training_pairs": [
                    {
                        "user_input": f"How do I save for goal {i}?",
                        "target_response": "Start small and automate it.",
                    },
                ],
            }
        )
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


@pytest.fixture
def training_file(db):
    return training_file_create(name="advisor", upload=io.BytesIO(conversations()), user=None)


@pytest.fixture
def smollm(db):
    return BaseModel.objects.get(name="SmolLM2-135M-Instruct")


@pytest.fixture
def smoke(db):
    return Preset.objects.get(key="smoke")


class FakeExecutor:
    """Stands in for a GPU provider: records launches, reports what the test says."""

    name = "local"

    def __init__(self):
        self.launched: list[dict] = []
        self.cancelled: list[tuple[str, bool]] = []
        self.state = ExecutorState.RUNNING
        self.exit_code = None

    def launch(self, *, job_id, attempt, spec, env):
        self.launched.append({"job_id": job_id, "attempt": attempt, "spec": spec, "env": env})
        return f"fake-{attempt}"

    def status(self, *, ref):
        return ExecutorStatus(self.state, exit_code=self.exit_code)

    def cancel(self, *, ref, force=False):
        self.cancelled.append((ref, force))

    def logs(self, *, job_id, tail=200):
        return "fake log line"


@pytest.fixture
def fake_executor(monkeypatch, settings):
    executor = FakeExecutor()
    monkeypatch.setattr("training.services.get_executor", lambda name: executor)
    monkeypatch.setattr("training.api.get_executor", lambda name: executor)
    from training import services, tasks

    # Launch tasks run at once, and on_commit callbacks fire inside the test transaction.
    monkeypatch.setattr(
        tasks.launch_training_job,
        "delay",
        lambda job_id: services.training_job_launch(job_id=job_id),
    )
    monkeypatch.setattr("django.db.transaction.on_commit", lambda fn, *a, **k: fn())
    return executor


@pytest.fixture
def engineer(api_as):
    return api_as(Role.ENGINEER)


def signed_event(
    job, type_: str, data: dict | None = None, *, event_id=None, sequence=0, ts=None, secret=None
):
    """(body, headers) of a worker event as gpu/PROTOCOL.md describes it."""
    body = json.dumps(
        {
            "event_id": str(event_id or uuid.uuid4()),
            "job_id": str(job.pk),
            "type": type_,
            "sequence": sequence,
            "created_at": "2026-11-22T07:30:00+00:00",
            "data": data or {},
        }
    ).encode()
    timestamp = str(int(ts if ts is not None else time.time()))
    headers = {
        "X-Crucible-Timestamp": timestamp,
        "X-Crucible-Signature": sign(secret or job.webhook_secret, timestamp, body),
        "X-Crucible-Event-Id": json.loads(body)["event_id"],
    }
    return body, headers


@pytest.fixture
def post_event(client):
    def send(job, type_, data=None, **kwargs):
        body, headers = signed_event(job, type_, data, **kwargs)
        return client.post(
            "/api/v1/training/webhook", data=body, content_type="application/json", headers=headers
        )

    return send


def shrink_smoke_preset(**hyperparameters) -> Preset:
    """Cut the Smoke preset to a few steps for a test whose claim is a path through the
    product (a page, a resume, a hand-off), not the training itself: one real full-length
    Smoke run (tests/training/test_end_to_end.py) is enough for the suite. Its sequence
    length stays (the sample's rows need it). The test database
    is flushed afterwards, and the catalogue re-creates the preset (post_migrate)."""
    smoke = Preset.objects.get(key="smoke")
    smoke.hyperparameters = {
        **smoke.hyperparameters,
        "max_steps": 4,
        "checkpoint_every_steps": 2,
        **hyperparameters,
    }
    smoke.save(update_fields=["hyperparameters"])
    return smoke
