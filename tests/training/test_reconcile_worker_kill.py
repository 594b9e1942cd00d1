"""Issue 18, scenario 4 (reconcile half): the Celery worker SIGKILLed in the middle of the
training reconcile, with real worker processes on the test's database and broker.

The reconcile (``training.tasks.reconcile_training_jobs``, acks_late) first accrues costs and
checks the budget alerts, then compares each running job with its executor. The test stops it
at a known point in the middle: the budget alert's row is written and its email sent, and its
Slack post hangs on a webhook stand-in the test owns, so the job's recovery has not happened
yet. The worker is SIGKILLed there, a new one started, and the reconcile sent again as the beat
scheduler does every 20 s (the Redis broker would redeliver the killed, unacknowledged message
too, after its visibility timeout; being idempotent, that copy changes nothing either). Each
side effect then happens exactly once: one alert, one email, one Slack post, one recovery, one
ledger row per day. The validation-run half of scenario 4 is
tests/evaluation/test_long_runs.py::test_a_run_whose_worker_is_killed_midway_is_restarted_and_completes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from billing.models import BudgetAlert, LedgerEntry, MonthlyBudget, NotificationLog
from billing.services import month_start
from config.celery import app
from tests.billing.conftest import make_job
from tests.factories import UserFactory
from tests.workers import database_url, reset_broker_pools, wait_until
from training.models import JobStatus, JobTransition, Recovery, TrainingJob

ROOT = Path(django_settings.BASE_DIR)
CELERY = Path(sys.executable).parent / "celery"
RECONCILE = "training.tasks.reconcile_training_jobs"
S = JobStatus


class HangingSlack:
    """An incoming-webhook stand-in: the first post hangs until ``release()`` (the worker is
    killed meanwhile), later ones are answered 200 and recorded in ``received``."""

    def __init__(self):
        self.arrived = threading.Event()
        self.released = threading.Event()
        self.received: list[dict] = []
        self.posts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.posts += 1
                if outer.posts == 1:
                    outer.arrived.set()
                    outer.released.wait(60)
                    return  # its sender is dead: nothing to answer
                outer.received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self):
        self.released.set()

    def close(self):
        self.release()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slack():
    server = HangingSlack()
    yield server
    server.close()


@pytest.fixture
def workers(tmp_path, slack):
    """``workers()`` starts a real worker process (``celery -A config worker``) on this test's
    database and broker, consuming only this test's queue (the launches a recovery enqueues
    wait on "control", unconsumed); ``workers.reconcile()`` sends the reconcile there as beat
    would. Whatever is left is stopped at the end."""
    queue = f"reconcile-kill-{uuid.uuid4().hex[:8]}"
    broker = tmp_path / "broker"
    original = dict(app.conf.broker_transport_options)
    reset_broker_pools()
    filesystem = app.conf.broker_url.startswith("filesystem")
    if filesystem:
        for folder in ("queue", "processed", "control"):
            (broker / folder).mkdir(parents=True)
        app.conf.broker_transport_options = {
            **original,
            "data_folder_in": str(broker / "queue"),
            "data_folder_out": str(broker / "queue"),
            "processed_folder": str(broker / "processed"),
            "control_folder": str(broker / "control"),
        }
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": database_url(),
        "CELERY_BROKER_DIR": str(broker),
        "SLACK_WEBHOOK_URL": slack.url,
        # The killed worker's claim on the alert it was sending expires quickly.
        "BILLING_ALERT_DELIVERY_LEASE_S": "2",
        "EMAIL_URL": "consolemail://",
        "PYTHONPATH": str(ROOT),
    }
    started: list[subprocess.Popen] = []

    def start() -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"worker-{len(started)}.log"
        proc = subprocess.Popen(
            [
                str(CELERY),
                "-A",
                "config",
                "worker",
                "-Q",
                queue,
                "-c",
                "1",
                "-n",
                f"kill{len(started)}-{uuid.uuid4().hex[:6]}@%h",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=ROOT,
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a kill takes its pool with it
        )
        started.append(proc)
        wait_until(
            lambda: " ready." in log.read_text() or proc.poll() is not None,
            90,
            "the worker to start",
        )
        assert proc.poll() is None, log.read_text()[-3000:]
        return proc, log

    start.reconcile = lambda: app.send_task(RECONCILE, queue=queue, routing_key=queue)
    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if not filesystem:
        with app.connection_for_write() as conn:
            for name in (queue, "control"):  # this test's queue, the recovery's launch
                conn.default_channel.queue_purge(name)
    app.conf.broker_transport_options = original
    reset_broker_pools()


def _succeeded(log: Path) -> int:
    return len(re.findall(rf"Task {re.escape(RECONCILE)}\[[0-9a-f-]+\] succeeded", log.read_text()))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.django_db(transaction=True)
def test_a_reconcile_killed_midway_finishes_after_restart_with_each_effect_once(
    workers, slack, training_file, smollm, smoke
):
    admin = UserFactory(is_superuser=True, is_staff=True)
    MonthlyBudget.objects.create(
        month=month_start(),
        amount=Decimal("10"),
        approval_threshold=Decimal("1000"),
        alert_thresholds=[{"percent": 50, "channels": ["email", "slack"]}],
    )
    now = timezone.now()
    # An H100 job training for an hour ($7.99 of the $10 budget: past the 50% alert) whose
    # worker process is gone: the reconcile recovers it.
    job = make_job(
        training_file=training_file,
        base_model=smollm,
        preset=smoke,
        name="killed reconcile",
        status=S.TRAINING,
        executor="local",
        stages=[(S.QUEUED, -1), (S.PROVISIONING, 0), (S.TRAINING, 1)],
        start=now - timedelta(hours=1),
        rate=Decimal("7.99"),
        executor_ref=f"{_dead_pid()}:0",
        attempt=1,
        last_event_at=now,
        last_heartbeat_at=now,
    )

    first, _ = workers()
    workers.reconcile()
    assert slack.arrived.wait(60), "the reconcile never reached the alert's Slack post"
    # The middle of the reconcile: the alert is stored and emailed, its Slack post in flight,
    # the job not yet looked at.
    alert = BudgetAlert.objects.get()
    assert alert.delivered_at is None and set(alert.delivery) == {"email"}
    assert not Recovery.objects.filter(job=job).exists()
    assert TrainingJob.objects.get(pk=job.pk).status == S.TRAINING
    os.killpg(first.pid, signal.SIGKILL)  # as a crash, an OOM kill or `docker kill` would
    first.wait(timeout=10)
    slack.release()

    _, log = workers()

    def finished():
        alert = BudgetAlert.objects.get()
        return alert.delivered_at and Recovery.objects.filter(job=job).exists()

    last_sent = 0.0

    def beat_until_finished():
        nonlocal last_sent
        if time.monotonic() - last_sent > 3:  # the beat's tick, faster
            workers.reconcile()
            last_sent = time.monotonic()
        return finished()

    wait_until(beat_until_finished, 90, "the restarted worker to finish the reconcile's work")
    # Once more after everything is done: nothing happens twice.
    done_before = _succeeded(log)
    workers.reconcile()
    wait_until(lambda: _succeeded(log) > done_before, 60, "one more reconcile")

    alert = BudgetAlert.objects.get()  # one alert
    assert set(alert.delivery) == {"email", "slack"} and alert.delivery["slack"]["ok"]
    assert len(slack.received) == 1 and "50%" in slack.received[0]["text"]  # one Slack post
    sent = NotificationLog.objects.filter(kind="budget_alert", ok=True)
    assert sorted(sent.values_list("channel", flat=True)) == ["email", "slack"]  # one email
    assert admin.email in sent.get(channel="email").recipients
    job.refresh_from_db()
    assert job.status == S.RECOVERING and job.recovery_count == 1  # one recovery
    assert Recovery.objects.filter(job=job).count() == 1
    assert JobTransition.objects.filter(job=job, to_status=S.RECOVERING).count() == 1
    entries = LedgerEntry.objects.filter(object_id=str(job.pk))
    assert entries.count() == len(set(entries.values_list("day", flat=True))) >= 1
    print(
        "reconcile killed mid-alert:",
        {
            "slack_posts": slack.posts,
            "slack_delivered": len(slack.received),
            "emails": sent.filter(channel="email").count(),
            "recoveries": 1,
            "reconciles_after_restart": _succeeded(log),
        },
    )
