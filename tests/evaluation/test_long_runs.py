"""Long validation runs: finer progress, cancelling, and the two acceptance tests of issue 12
with real Celery worker processes on the test's broker and database:

- a worker killed (SIGKILL) mid-run: the beat reconcile restarts the run on another worker, it
  resumes from what was stored and completes with no duplicated rows;
- two long runs hold the long worker while the control worker still launches a new training
  job, reconciles and records its heartbeat.

The workers are ``celery -A tests.evaluation.long_worker worker -Q long|control``: the real app,
settings, routes, broker, tasks and services, with model scoring stood in (see that module).
"""

# ruff: noqa: F811  (fixtures imported from core_fixtures are redefined as arguments)
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.test import Client

from billing.models import BudgetAlert, NotificationLog
from config import longtasks
from config.celery import app
from config.roles import Role
from evaluation import services
from evaluation.models import GeneratedResponse, JudgeScore, Report, RunStatus, ValidationRun
from tests.browser.test_dashboard_browser import (  # noqa: F401 (fixtures)
    PASSWORD,
    _console_errors,
    _shoot,
    _sign_in,
    browser,
    driver,
)
from tests.browser.test_dashboard_browser import _wait as _browser_wait
from tests.conftest import assert_envelope
from tests.evaluation.core_fixtures import (  # noqa: F401
    completed_job,
    completed_run,
    fake_pdf,
    fake_scoring,
    fast_settings,
    make_completed_job,
)
from tests.factories import UserFactory
from tests.workers import database_url, reset_broker_pools

ROOT = Path(django_settings.BASE_DIR)
CELERY = Path(sys.executable).parent / "celery"
# Responses per run: both sides of the 50 EI and 30 brand-voice items.
RESPONSES = 2 * (50 + 30)


def _wait(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# --- Progress and cancelling, in process ------------------------------------------------------


@pytest.fixture
def every_item(monkeypatch):
    """Progress written after every item (the product throttles to one write per 2 s)."""
    monkeypatch.setattr(longtasks, "PROGRESS_INTERVAL_S", 0.0)


def test_progress_names_the_item_inside_each_stage(
    completed_job, fake_scoring, fake_pdf, every_item, monkeypatch
):
    seen: list[tuple[str, float]] = []
    run = services.validation_run_create(job=completed_job, user=None, enqueue=False)
    ask = fake_scoring.option_logliks

    def watching(models, questions, *, use_adapter):
        seen.append(ValidationRun.objects.values_list("stage_detail", "progress").get(pk=run.pk))
        return ask(models, questions, use_adapter=use_adapter)

    monkeypatch.setattr("evaluation.scoring.option_logliks", watching)
    services.validation_run_execute(run_id=str(run.pk))
    run.refresh_from_db()
    assert run.status == RunStatus.COMPLETED and run.stage_detail == ""
    details = [d for d, _ in seen]
    # Before question 38 the page said 37 were done, and the bar had moved inside the stage.
    assert "Retention: 37/100 questions (base model)" in details
    assert "Retention: 100/100 questions (base model)" in details
    assert "Retention: 99/100 questions (trained adapter)" in details
    progress = [p for _, p in seen if p]
    assert progress == sorted(progress)
    assert services.STAGES["retention"] < max(progress) < services.STAGES["generating"]


def test_progress_writes_are_throttled(completed_job, fake_scoring, fake_pdf, monkeypatch):
    beats: list[str] = []
    write = longtasks.Heartbeat.write

    def counting(self, **fields):
        beats.append(fields.get("stage_detail", ""))
        return write(self, **fields)

    monkeypatch.setattr(longtasks.Heartbeat, "write", counting)
    run = services.validation_run_create(job=completed_job, user=None, enqueue=False)
    services.validation_run_execute(run_id=str(run.pk))
    # 200 retention items, 160 responses, 160 judgements: stage writes only, nearly no item
    # writes (the fakes take milliseconds; one write per 2 s at most).
    assert sum(1 for d in beats if d.startswith("Retention:")) <= 2
    assert len(beats) < 20


def test_cancelling_a_running_run_stops_it_between_items(
    completed_job, fake_scoring, fake_pdf, every_item, monkeypatch
):
    user = UserFactory(role=Role.ENGINEER)
    run = services.validation_run_create(job=completed_job, user=user, enqueue=False)
    generate = fake_scoring.generate

    def cancel_during_first_batch(models, conversations, **kw):
        if not GeneratedResponse.objects.filter(run=run).exists():
            services.validation_run_cancel(run=run, user=user)
        return generate(models, conversations, **kw)

    monkeypatch.setattr("evaluation.scoring.generate", cancel_during_first_batch)
    result = services.validation_run_execute(run_id=str(run.pk))
    assert result.status == RunStatus.CANCELLED and result.cancelled_by == user
    # The batch in hand is stored, then the task notices and stops: nothing more.
    assert fake_scoring.calls.count(("generate", False)) == 1
    assert GeneratedResponse.objects.filter(run=run).count() == 16
    assert not JudgeScore.objects.filter(response__run=run).exists()
    assert not Report.objects.filter(run=run).exists()
    assert result.error_type == "" and result.completed_at is not None


def test_a_cancelled_pending_run_never_starts(completed_job, fake_scoring):
    run = services.validation_run_create(job=completed_job, user=None, enqueue=False)
    services.validation_run_cancel(run=run, user=None)
    assert services.validation_run_execute(run_id=str(run.pk)) is None
    assert fake_scoring.calls == []
    # A new run of the same job may start: a cancelled one is not in progress.
    assert services.validation_run_create(job=completed_job, user=None, enqueue=False)


def test_a_finished_run_cannot_be_cancelled(completed_run):
    from config.errors import Conflict

    with pytest.raises(Conflict, match="Only a pending or running validation"):
        services.validation_run_cancel(run=completed_run, user=None)
    completed_run.refresh_from_db()
    assert completed_run.status == RunStatus.COMPLETED


def test_the_reconcile_restarts_a_stale_run_and_fails_one_restarted_too_often(
    completed_job, settings, monkeypatch
):
    from datetime import timedelta

    from django.utils import timezone

    import evaluation.tasks  # registers its reconcile step
    from config.tasks import reconcile_long_tasks

    queued: list[str] = []
    monkeypatch.setattr(evaluation.tasks.execute_validation_run, "delay", queued.append)
    settings.LONG_TASK_MAX_ATTEMPTS = 3
    long_ago = timezone.now() - timedelta(seconds=settings.LONG_TASK_STALE_AFTER_S + 5)
    stale = services.validation_run_create(job=completed_job, user=None, enqueue=False)
    ValidationRun.objects.filter(pk=stale.pk).update(
        status=RunStatus.RUNNING, started_at=long_ago, heartbeat_at=long_ago, attempts=1
    )
    other = make_completed_job(name="Other")
    alive = services.validation_run_create(job=other, user=None, enqueue=False)
    ValidationRun.objects.filter(pk=alive.pk).update(
        status=RunStatus.RUNNING, started_at=long_ago, heartbeat_at=timezone.now(), attempts=1
    )
    third = make_completed_job(name="Third")
    doomed = services.validation_run_create(job=third, user=None, enqueue=False)
    ValidationRun.objects.filter(pk=doomed.pk).update(
        status=RunStatus.RUNNING, started_at=long_ago, heartbeat_at=long_ago, attempts=3
    )

    summary = reconcile_long_tasks()["validation_runs"]
    assert summary == {"requeued": [str(stale.pk)], "failed": [str(doomed.pk)]}
    assert queued == [str(stale.pk)]
    stale.refresh_from_db(), alive.refresh_from_db(), doomed.refresh_from_db()
    assert stale.status == RunStatus.PENDING and stale.claimed_by == ""
    assert alive.status == RunStatus.RUNNING
    assert doomed.status == RunStatus.FAILED and doomed.error_type == "WorkerLost"
    assert "stopped 3 times" in doomed.error_message
    # A second reconcile finds nothing to do (the first one's claim was atomic).
    assert reconcile_long_tasks()["validation_runs"] == {"requeued": [], "failed": []}


# --- Cancel through the API and the page ------------------------------------------------------


@pytest.fixture
def pending_run(completed_job):
    return services.validation_run_create(job=completed_job, user=None, enqueue=False)


def test_cancel_api_needs_the_run_jobs_capability(anon_api, api_as, pending_run):
    url = f"validation/runs/{pending_run.pk}/cancel"
    assert_envelope(anon_api.post(url), 401)
    for role in (Role.VIEWER, Role.ANALYST):
        assert_envelope(api_as(role).post(url), 403, "permission_denied")
    pending_run.refresh_from_db()
    assert pending_run.status == RunStatus.PENDING

    response = api_as(Role.ENGINEER).post(url)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "cancelled" and body["stage_detail"].startswith("Cancelled by")
    assert ValidationRun.objects.get(pk=pending_run.pk).status == RunStatus.CANCELLED


def test_cancel_api_refuses_a_finished_or_unknown_run(api_as, completed_run):
    engineer = api_as(Role.ENGINEER)
    error = assert_envelope(engineer.post(f"validation/runs/{completed_run.pk}/cancel"), 409)
    assert error["details"] == {"status": "completed"}
    assert_envelope(engineer.post(f"validation/runs/{uuid.uuid4()}/cancel"), 404)
    completed_run.refresh_from_db()
    assert completed_run.status == RunStatus.COMPLETED


def _login(client: Client, role: Role):
    user = UserFactory(role=role)
    client.force_login(user)
    return user


def test_the_run_page_offers_cancel_to_those_who_may(client, pending_run):
    from django.urls import reverse

    url = reverse("evaluation:run", args=[pending_run.pk])
    cancel = reverse("evaluation:cancel", args=[pending_run.pk])
    ValidationRun.objects.filter(pk=pending_run.pk).update(
        status=RunStatus.RUNNING, stage="retention", stage_detail="Retention: 37/100 questions"
    )
    _login(client, Role.VIEWER)
    html = client.get(url).content.decode()
    assert "Retention: 37/100 questions" in html and "Knowledge retention" in html
    assert 'data-action="cancel-run"' not in html
    assert client.post(cancel).status_code == 403
    assert ValidationRun.objects.get(pk=pending_run.pk).status == RunStatus.RUNNING

    _login(client, Role.ENGINEER)
    html = client.get(url).content.decode()
    assert 'data-action="cancel-run"' in html and cancel in html
    response = client.post(cancel, headers={"HX-Request": "true"})
    assert response.status_code == 204 and response["HX-Refresh"] == "true"
    assert ValidationRun.objects.get(pk=pending_run.pk).status == RunStatus.CANCELLED
    html = client.get(url).content.decode()
    assert "The validation was cancelled" in html and 'data-action="cancel-run"' not in html
    assert "Validate again" in html

    # Cancelling again: the page says why, and nothing changes.
    response = client.post(cancel)
    assert response.status_code == 409
    assert "Only a pending or running validation can be cancelled" in response.content.decode()


def test_cancel_page_action_needs_a_login(client, pending_run):
    from django.urls import reverse

    response = client.post(reverse("evaluation:cancel", args=[pending_run.pk]))
    assert response.status_code == 302 and "/login/" in response["Location"]
    assert client.get(reverse("evaluation:cancel", args=[pending_run.pk])).status_code in (
        302,
        405,
    )
    assert ValidationRun.objects.get(pk=pending_run.pk).status == RunStatus.PENDING


# --- Real workers -----------------------------------------------------------------------------


@pytest.fixture
def workers(tmp_path, settings):
    """Starts real worker processes on this test's database and its own broker folder (the
    configured Redis in production mode), and stops whatever is left at the end."""
    broker = tmp_path / "broker"
    original = dict(app.conf.broker_transport_options)
    reset_broker_pools()
    if app.conf.broker_url.startswith("filesystem"):
        for folder in ("queue", "processed", "control"):
            (broker / folder).mkdir(parents=True)
        app.conf.broker_transport_options = {
            **original,
            "data_folder_in": str(broker / "queue"),
            "data_folder_out": str(broker / "queue"),
            "processed_folder": str(broker / "processed"),
            "control_folder": str(broker / "control"),
        }
    else:
        app.control.purge()
    settings.LONG_TASK_STALE_AFTER_S = 3
    calls = tmp_path / "calls.jsonl"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": database_url(),
        "CELERY_BROKER_DIR": str(broker),
        "LONG_TASK_STALE_AFTER_S": "3",
        "EVALUATION_BOOTSTRAP": "200",
        "EVALUATION_MAX_NEW_TOKENS": "16",
        "EVALUATION_BATCH_SIZE": "16",
        "EVALUATION_JUDGE": "offline",
        "MODEL_GATEWAY_URL": "",
        "HF_TOKEN": "",
        "LONG_WORKER_CALLS": str(calls),
        "LONG_WORKER_HOLD": str(tmp_path / "hold"),
        "PYTHONPATH": str(ROOT),
    }
    started: list[subprocess.Popen] = []

    def start(queue: str, concurrency: int) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{queue}-{len(started)}.log"
        proc = subprocess.Popen(
            [
                str(CELERY),
                "-A",
                "tests.evaluation.long_worker",
                "worker",
                "-Q",
                queue,
                "-c",
                str(concurrency),
                "-n",
                f"{queue}{len(started)}-{uuid.uuid4().hex[:6]}@%h",
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
        _wait(
            lambda: " ready." in log.read_text() or proc.poll() is not None,
            90,
            f"the {queue} worker to start",
        )
        assert proc.poll() is None, log.read_text()[-3000:]
        return proc, log

    def calls_made() -> list[dict]:
        if not calls.exists():
            return []
        return [json.loads(line) for line in calls.read_text().splitlines() if line]

    start.calls = calls_made
    start.hold = tmp_path / "hold"
    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    app.conf.broker_transport_options = original
    reset_broker_pools()


def _succeeded(log: Path, task: str, what: str = "succeeded") -> int:
    """How many times the worker logged ``task`` as succeeded (or received)."""
    return len(re.findall(rf"Task {re.escape(task)}\[[0-9a-f-]+\] {what}", log.read_text()))


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the worker and its pool, as a crash, an OOM kill or `docker kill` would."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.mark.django_db(transaction=True)
def test_a_run_whose_worker_is_killed_midway_is_restarted_and_completes(workers):
    import evaluation.tasks  # noqa: F401  (registers its reconcile step)
    from config.tasks import reconcile_long_tasks

    job = make_completed_job(name="Killed mid-run")
    run = services.validation_run_create(job=job, user=None)  # enqueued on the long queue
    first, _ = workers("long", 1)

    def some_responses_stored():
        row = ValidationRun.objects.get(pk=run.pk)
        n = GeneratedResponse.objects.filter(run=run).count()
        return row.stage == "generating" and n >= 32 and n

    _wait(some_responses_stored, 120, "the run to store two batches")
    _kill(first)
    stored_before = GeneratedResponse.objects.filter(run=run).count()
    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING and run.attempts == 1  # nobody will redeliver it
    assert "retention" in run.metrics and "perplexity" in run.metrics

    _, second_log = workers("long", 1)
    # The beat reconcile (run here by hand) restarts it once its heartbeat is 3 s old.
    summary = _wait(
        lambda: reconcile_long_tasks()["validation_runs"]["requeued"], 30, "the reconcile"
    )
    assert summary == [str(run.pk)]

    def finished():
        row = ValidationRun.objects.get(pk=run.pk)
        return row.status in (RunStatus.COMPLETED, RunStatus.FAILED) and row

    done = _wait(finished, 120, "the restarted run to finish")
    assert done.status == RunStatus.COMPLETED, (done.error_type, done.error_message)
    assert done.attempts == 2 and done.progress == 100.0

    # No duplicated rows: one response per item and side, one judge score per response.
    responses = GeneratedResponse.objects.filter(run=run)
    keys = set(responses.values_list("suite", "item_id", "side"))
    assert responses.count() == len(keys) == RESPONSES
    assert JudgeScore.objects.filter(response__run=run).count() == RESPONSES
    assert Report.objects.filter(run=run).count() == 1
    assert done.metrics["emotional_intelligence"]["trained_mean"] is not None

    # Resumed, not redone: perplexity and retention ran once (by the killed worker), and the
    # second worker generated only what was missing (at most the batch in flight is redone).
    calls = workers.calls()
    pids = {c["pid"] for c in calls}
    assert len(pids) >= 2
    by_first = {c["pid"] for c in calls if c["call"] == "document_nll"}
    assert all(c["pid"] in by_first for c in calls if c["call"] in ("option_logliks",))
    assert sum(c["n"] for c in calls if c["call"] == "option_logliks") == 200
    generated_later = sum(
        c["n"] for c in calls if c["call"] == "generate" and c["pid"] not in by_first
    )
    assert generated_later == RESPONSES - stored_before
    _wait(
        lambda: _succeeded(second_log, "evaluation.tasks.execute_validation_run"),
        30,
        "the second worker's task to end",
    )
    # Restarted once and run once after the kill: another reconcile leaves the finished run
    # alone, and nothing was announced twice (a validation run sends no notice or alert).
    assert reconcile_long_tasks()["validation_runs"]["requeued"] == []
    assert _succeeded(second_log, "evaluation.tasks.execute_validation_run") == 1
    assert ValidationRun.objects.get(pk=run.pk).attempts == 2
    assert not NotificationLog.objects.exists() and not BudgetAlert.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_control_work_goes_on_while_two_long_runs_hold_the_long_worker(workers):
    from django.core.cache import cache

    from config.tasks import WORKER_HEARTBEAT_KEY, last_worker_heartbeat, reconcile_long_tasks
    from training.models import JobStatus, TrainingJob
    from training.tasks import launch_training_job, reconcile_training_jobs

    workers.hold.touch()  # generation waits while this file exists
    runs = [
        services.validation_run_create(job=make_completed_job(name=f"Held {i}"), user=None)
        for i in (1, 2)
    ]
    _, long_log = workers("long", 1)
    _, control_log = workers("control", 2)

    def one_held():
        statuses = dict(ValidationRun.objects.values_list("pk", "status"))
        return sorted(statuses[r.pk] for r in runs) == [RunStatus.PENDING, RunStatus.RUNNING]

    _wait(one_held, 60, "a run to hold the long worker")
    held = ValidationRun.objects.get(pk__in=[r.pk for r in runs], status=RunStatus.RUNNING)
    _wait(lambda: ValidationRun.objects.get(pk=held.pk).stage == "generating", 60, "generation")

    # A new training job, launched while both long runs wait for the long worker's one slot.
    new_job = make_completed_job(name="New job")
    TrainingJob.objects.filter(pk=new_job.pk).update(status=JobStatus.QUEUED, completed_at=None)
    cache.delete(WORKER_HEARTBEAT_KEY)
    launched_at = time.monotonic()
    launch_training_job.delay(str(new_job.pk))
    reconcile_training_jobs.delay()
    reconcile_long_tasks.delay()
    from config.tasks import worker_heartbeat

    worker_heartbeat.delay()

    _wait(
        lambda: TrainingJob.objects.get(pk=new_job.pk).status != JobStatus.QUEUED,
        60,
        "the new job's launch",
    )
    _wait(lambda: last_worker_heartbeat() is not None, 30, "the worker heartbeat task")
    _wait(
        lambda: (
            _succeeded(control_log, "training.tasks.reconcile_training_jobs")
            and _succeeded(control_log, "config.tasks.reconcile_long_tasks")
        ),
        30,
        "the reconciles",
    )
    elapsed = time.monotonic() - launched_at
    new_job.refresh_from_db()
    assert new_job.attempt == 1
    assert any(c["call"] == "launch" for c in workers.calls())
    # ...and all that while the long work was still there: one run held, the other queued.
    statuses = sorted(
        ValidationRun.objects.filter(pk__in=[r.pk for r in runs]).values_list("status", flat=True)
    )
    assert statuses == [RunStatus.PENDING, RunStatus.RUNNING], statuses
    assert elapsed < 60
    assert _succeeded(control_log, "training.tasks.launch_training_job") == 1
    assert _succeeded(control_log, "evaluation.tasks.execute_validation_run", "received") == 0
    assert _succeeded(long_log, "evaluation.tasks.execute_validation_run", "received") >= 1
    for task in ("launch_training_job", "reconcile_training_jobs"):
        assert _succeeded(long_log, f"training.tasks.{task}", "received") == 0
    # The held run was not taken for dead: its heartbeat is fresh although it is waiting.
    assert reconcile_long_tasks()["validation_runs"]["requeued"] == []

    # Cancel both: the held one stops at its next item, the queued one never starts.
    for run in runs:
        services.validation_run_cancel(run=ValidationRun.objects.get(pk=run.pk), user=None)
    workers.hold.unlink()
    _wait(
        lambda: _succeeded(long_log, "evaluation.tasks.execute_validation_run") == 2,
        60,
        "both long tasks to end",
    )
    for run in runs:
        run.refresh_from_db()
        assert run.status == RunStatus.CANCELLED
        assert not Report.objects.filter(run=run).exists()
    assert GeneratedResponse.objects.filter(run=held).count() < RESPONSES


def test_the_runs_list_and_the_job_card_show_where_a_run_is(client, pending_run):
    from django.urls import reverse

    ValidationRun.objects.filter(pk=pending_run.pk).update(
        status=RunStatus.RUNNING,
        stage="retention",
        progress=27.4,
        stage_detail="Retention: 37/100 questions (base model)",
    )
    _login(client, Role.VIEWER)
    for url in (
        reverse("evaluation:index"),
        reverse("training:detail", args=[pending_run.job_id]),
    ):
        html = client.get(url).content.decode()
        assert "Retention: 37/100 questions (base model)" in html, url


# --- In the browser ----------------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_cancel_from_the_run_page_in_a_browser(browser, live_server, completed_job):
    """The running run's panel says where it is and offers Cancel; confirming it shows the
    cancelled run. Screenshots: var/screenshots/evaluation-run-{running,cancelled}.png."""
    from django.utils import timezone
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    from config.services import user_create

    user_create(username="ada", role=Role.ENGINEER, actor=None, password=PASSWORD)
    run = services.validation_run_create(job=completed_job, user=None, enqueue=False)
    ValidationRun.objects.filter(pk=run.pk).update(
        status=RunStatus.RUNNING,
        stage="retention",
        progress=27.4,
        stage_detail="Retention: 37/100 questions (base model)",
        heartbeat_at=timezone.now(),
        attempts=2,
    )
    _sign_in(browser, live_server, "ada", PASSWORD)
    _browser_wait(browser).until(ec.url_to_be(f"{live_server.url}/"))
    browser.get(f"{live_server.url}/evaluations/runs/{run.pk}/")
    panel = browser.find_element(By.ID, "run-status")
    assert "Knowledge retention" in panel.text and "27%" in panel.text
    assert "Retention: 37/100 questions (base model)" in panel.text
    assert "restarted" in panel.text
    _shoot(browser, "evaluation-run-running.png")
    panel.find_element(By.CSS_SELECTOR, '[data-action="cancel-run"]').click()
    _browser_wait(browser).until(ec.alert_is_present()).accept()
    _browser_wait(browser).until(ec.presence_of_element_located((By.ID, "run-cancelled")))
    assert "The validation was cancelled by" in browser.find_element(By.ID, "run-cancelled").text, (
        browser.find_element(By.ID, "run-cancelled").text
    )
    assert not browser.find_elements(By.ID, "run-status")
    assert _console_errors(browser) == []
    _shoot(browser, "evaluation-run-cancelled.png")
    assert ValidationRun.objects.get(pk=run.pk).status == RunStatus.CANCELLED
