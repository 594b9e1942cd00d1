"""Every link in every notification opens its page (issue 12: emails linked to a 404)."""

import io
import re
from decimal import Decimal
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
from django.core import mail
from django.test import Client

from billing import notifications
from config import addresses
from config.roles import Role
from corpora.services import training_file_create
from tests.factories import PASSWORD, UserFactory
from tests.training.conftest import conversations
from training import services
from training.models import BaseModel, JobStatus, Preset, TrainingJob

pytestmark = pytest.mark.django_db

BASE = "https://crucible.example.com"
LINK = re.compile(r"https?://[^\s)>\"']+")


@pytest.fixture
def slack(monkeypatch):
    sent = []

    def send_slack(*, kind, text):
        sent.append(text)
        return {"ok": True}

    monkeypatch.setattr(notifications, "send_slack", send_slack)
    return sent


@pytest.fixture
def job(db):
    owner = UserFactory(role=Role.ENGINEER, email="owner@example.com")
    training_file = training_file_create(
        name="advisor", upload=io.BytesIO(conversations()), user=owner
    )
    created = services.training_job_create(
        user=owner,
        training_file=training_file,
        base_model=BaseModel.objects.get(name="SmolLM2-135M-Instruct"),
        preset=Preset.objects.get(key="smoke"),
        name="Linked job",
    )
    TrainingJob.objects.filter(pk=created.pk).update(status=JobStatus.COMPLETED)
    return TrainingJob.objects.get(pk=created.pk)


def links_in(*texts: str) -> list[str]:
    found = [link.rstrip(".,") for text in texts for link in LINK.findall(text)]
    assert found, texts
    return found


def assert_links_open(links: list[str]) -> None:
    client = Client()
    assert client.login(username=UserFactory(role=Role.VIEWER).username, password=PASSWORD)
    for link in links:
        assert link.startswith(BASE + "/"), link
        response = client.get(urlparse(link).path)
        assert response.status_code == 200, (link, response.status_code)


@pytest.fixture(autouse=True)
def public_url(settings):
    settings.CRUCIBLE_PUBLIC_URL = BASE
    settings.SLACK_WEBHOOK_URL = "https://hooks.slack.example/x"


def test_job_finished_links(job, slack):
    for status in (JobStatus.COMPLETED, JobStatus.FAILED):
        TrainingJob.objects.filter(pk=job.pk).update(status=status, error_message="boom")
        job.refresh_from_db()
        mail.outbox.clear()
        slack.clear()
        result = notifications.job_finished_notify(job=job)
        assert result["email"]["ok"], result
        links = links_in(mail.outbox[0].body, *slack)
        assert f"{BASE}/training/{job.pk}/" in links
        assert all("/training/jobs/" not in link for link in links)
        assert_links_open(links)


def test_cost_variance_links(job, slack):
    cost = SimpleNamespace(
        accrued=Decimal("3.40"), variance_pct=70.0, estimate_cost=Decimal("2.00")
    )
    notifications.cost_variance_notify(job=job, cost=cost)
    links = links_in(mail.outbox[0].body, *slack)
    assert f"{BASE}/training/{job.pk}/" in links
    assert_links_open(links)


def test_budget_alert_links(job, slack):
    UserFactory(role=Role.ADMIN, email="admin@example.com", is_superuser=True)
    alert = SimpleNamespace(threshold=80, channels=["email", "slack"])
    summary = {
        "month": "2026-12",
        "spent": Decimal("400"),
        "budget": Decimal("500"),
        "remaining": Decimal("100"),
        "forecast": Decimal("450"),
        "active_jobs": [{"name": job.name, "status": "training"}],
    }
    notifications.budget_alert_notify(alert=alert, summary=summary)
    links = links_in(mail.outbox[0].body, *slack)
    assert f"{BASE}/budgets/" in links
    assert_links_open(links)


def test_links_follow_the_served_address_when_no_public_url_is_set(settings, job, monkeypatch):
    settings.CRUCIBLE_PUBLIC_URL = ""
    monkeypatch.setattr(addresses, "_noted", {})
    addresses.note_served_address({"SERVER_NAME": "box", "SERVER_PORT": "8765"})
    notifications.job_finished_notify(job=job)
    assert f"http://127.0.0.1:8765/training/{job.pk}/" in mail.outbox[0].body
