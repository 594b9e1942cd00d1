import json
import threading
from datetime import timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from django.utils import timezone

from billing.models import GpuPrice, JobCost
from tests.training import conftest as training_fixtures
from training.config import resolve_configuration
from training.models import JobStatus, JobTransition, TrainingJob

H100 = "h100-pcie-80gb"
# The training tests' fixtures, shared.
training_file = training_fixtures.training_file
smollm = training_fixtures.smollm
smoke = training_fixtures.smoke
fake_executor = training_fixtures.fake_executor


@pytest.fixture
def h100(db):
    return GpuPrice.objects.get(gpu_type=H100)


def make_job(
    *,
    training_file,
    base_model,
    preset,
    status=JobStatus.PENDING,
    stages=(),
    start=None,
    gpu_type=H100,
    spot=False,
    executor="runpod",
    overrides=None,
    tags=(),
    user=None,
    rate=None,
    estimate=None,
    **fields,
):
    """A job written straight through the ORM, with transitions at given offsets.

    ``stages``: [(status, seconds after ``start``)], each the moment the job entered it.
    """
    configuration = resolve_configuration(
        preset_hyperparameters=preset.hyperparameters,
        overrides=overrides,
        context_length=base_model.context_length,
    )
    job = TrainingJob.objects.create(
        name=fields.pop("name", "job"),
        training_file=training_file,
        base_model=base_model,
        preset=preset,
        configuration=configuration,
        executor=executor,
        gpu_type=gpu_type,
        spot=spot,
        tags=list(tags),
        created_by=user,
        status=status,
        **fields,
    )
    start = start or timezone.now() - timedelta(hours=1)
    previous = JobStatus.PENDING
    for to, offset in stages:
        t = JobTransition.objects.create(job=job, from_status=previous, to_status=to)
        JobTransition.objects.filter(pk=t.pk).update(at=start + timedelta(seconds=offset))
        previous = to
    if rate is not None or estimate is not None:
        JobCost.objects.update_or_create(
            job=job,
            defaults={
                "gpu_type": gpu_type or "cpu-local",
                "spot": spot,
                "rate_per_hour": Decimal(str(rate or 0)),
                "estimate_cost": Decimal(str(estimate)) if estimate is not None else None,
            },
        )
    return job


class SlackServer:
    """An incoming-webhook stand-in on 127.0.0.1 that records what it receives."""

    def __init__(self, statuses=()):
        self.received: list[dict] = []
        self.statuses = list(statuses)  # answered first, then 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                status = outer.statuses.pop(0) if outer.statuses else 200
                if status == 200:
                    outer.received.append(json.loads(body))
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slack(settings, monkeypatch):
    server = SlackServer()
    settings.SLACK_WEBHOOK_URL = server.url
    monkeypatch.setattr("billing.notifications.SLACK_RETRY_INITIAL_S", 0.01)
    yield server
    server.close()
