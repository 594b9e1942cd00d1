"""Work routed to queues by kind: short "control" work never waits behind "long" work.

Routing through the real settings, a round trip through the configured broker on each queue
(a control-only worker leaves long work alone), and the long-task helpers of config/longtasks.py.
The acceptance tests with real worker processes are in tests/evaluation/test_long_runs.py.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from celery.contrib.testing.worker import start_worker
from django.utils import timezone

from config import longtasks
from config.celery import app
from tests.config.test_celery import isolated_broker  # noqa: F401  (fixture)

LONG = {
    "evaluation.tasks.execute_validation_run",
    "corpora.tasks.export_run",
    "training.tasks.run_playground",
}
CONTROL = {
    "config.tasks.worker_heartbeat",
    "config.tasks.reconcile_long_tasks",
    "training.tasks.reconcile_training_jobs",
    "training.tasks.launch_training_job",
    "training.tasks.retry_training_job_launch",
    "training.tasks.release_training_job_pods",
    "training.tasks.sweep_runpod_pods",
    "billing.tasks.notify_job_finished",
    "billing.tasks.refresh_gpu_prices",
    "billing.tasks.accrue_costs",
    "evaluation.tasks.recompute_validation_metrics",
    "celery.backend_cleanup",
}


def _queue(task_name: str) -> str:
    return app.amqp.router.route({}, task_name)["queue"].name


def test_queues_are_named_control_and_long_and_control_is_the_default():
    assert {q.name for q in app.conf.task_queues} == {"control", "long"}
    assert app.conf.task_default_queue == "control"


def _long_tasks() -> set[str]:
    """Every task routed to "long" (other apps add theirs, e.g. batch and knowledge bases)."""
    app.loader.import_default_modules()  # every app's tasks module, as a worker does
    return {n for n in app.tasks if not n.startswith("celery.") and _queue(n) == "long"}


def test_every_task_goes_to_the_queue_of_its_kind():
    long = _long_tasks()
    assert long >= LONG
    for name in LONG:
        assert name in app.tasks, name
        assert _queue(name) == "long", name
    for name in CONTROL:
        assert _queue(name) == "control", name
    # Anything not routed to long is control work, the beat schedule included.
    others = {n for n in app.tasks if not n.startswith("celery.") and n not in long}
    assert others >= CONTROL - {"celery.backend_cleanup"}
    assert {_queue(n) for n in others} == {"control"}
    assert {_queue(e["task"]) for e in app.conf.beat_schedule.values()} == {"control"}
    assert "reconcile-long-tasks" in app.conf.beat_schedule


def test_long_tasks_have_larger_time_limits_than_the_default():
    default = app.conf.task_time_limit
    for name in _long_tasks():
        task = app.tasks[name]
        assert task.time_limit and task.time_limit > default, name
        assert task.soft_time_limit and task.soft_time_limit < task.time_limit, name
        assert task.acks_late, name


@pytest.fixture
def consume_from():
    """start_worker(queues=...) selects the app's queues for the whole process: restore."""
    yield
    app.amqp.queues._consume_from = None


@pytest.mark.django_db(transaction=True)
def test_each_queue_round_trips_through_the_broker_and_control_never_takes_long_work(
    isolated_broker,  # noqa: F811
    consume_from,
):
    from evaluation.tasks import execute_validation_run, recompute_validation_metrics

    missing = str(uuid.uuid4())  # no such run: both tasks return at once
    long_result = execute_validation_run.delay(missing)
    with start_worker(app, perform_ping_check=False, shutdown_timeout=20, queues=["control"]):
        control_result = recompute_validation_metrics.delay(missing)
        assert control_result.get(timeout=30) is False
        time.sleep(1.0)
        assert long_result.state == "PENDING"  # still on the long queue, untouched
    app.amqp.queues._consume_from = None
    with start_worker(app, perform_ping_check=False, shutdown_timeout=20, queues=["long"]):
        assert long_result.get(timeout=30) is None
    assert long_result.state == "SUCCESS"


# --- config/longtasks.py ------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def running_run(db):
    from evaluation.models import RunStatus, ValidationRun
    from tests.evaluation.core_fixtures import make_completed_job

    run = ValidationRun.objects.create(
        job=make_completed_job(),
        status=RunStatus.RUNNING,
        claimed_by="host:1:abc",
        started_at=timezone.now(),
        heartbeat_at=timezone.now() - timedelta(minutes=1),
    )
    return run


def test_progress_is_written_at_most_every_interval_and_refreshes_the_heartbeat(running_run):
    from evaluation.models import ValidationRun

    clock = Clock()
    beat = longtasks.Heartbeat(
        ValidationRun, running_run.pk, claim="host:1:abc", running="running", clock=clock
    )
    assert beat.tick(progress=20) is False  # the interval has not passed yet
    clock.now = 1.9
    assert beat.tick(progress=21) is False
    clock.now = 2.0
    assert beat.tick(progress=22) is True
    row = ValidationRun.objects.get(pk=running_run.pk)
    assert row.progress == 22 and row.heartbeat_at > running_run.heartbeat_at
    clock.now = 3.0
    assert beat.tick(progress=23) is False and beat.writes == 1


def test_a_write_on_a_row_cancelled_or_claimed_by_another_worker_stops_the_task(running_run):
    from evaluation.models import ValidationRun

    beat = longtasks.Heartbeat(ValidationRun, running_run.pk, claim="host:1:abc", running="running")
    ValidationRun.objects.filter(pk=running_run.pk).update(claimed_by="other:2:def")
    with pytest.raises(longtasks.Stopped):
        beat.write(progress=50)
    ValidationRun.objects.filter(pk=running_run.pk).update(
        claimed_by="host:1:abc", status="cancelled"
    )
    with pytest.raises(longtasks.Stopped):
        beat.write(progress=50)
    assert beat.finish(status="failed") is False
    assert ValidationRun.objects.get(pk=running_run.pk).status == "cancelled"


def test_worker_claims_are_unique_per_attempt():
    first, second = longtasks.worker_claim(), longtasks.worker_claim()
    assert first != second and first.rsplit(":", 1)[0] == second.rsplit(":", 1)[0]


def test_an_export_left_running_past_its_time_limit_is_queued_again(db, monkeypatch):
    """Exports have no heartbeat column: past their hard time limit their worker is gone."""
    import corpora.tasks
    from corpora.models import Export
    from tests.evaluation.core_fixtures import make_completed_job

    queued: list[str] = []
    monkeypatch.setattr(corpora.tasks.export_run_task, "delay", queued.append)
    source = make_completed_job().training_file
    old = timezone.now() - timedelta(seconds=corpora.tasks.EXPORT_TIME_LIMIT + 300)

    def export(started_at):
        return Export.objects.create(
            training_file=source,
            unit=Export.Unit.CONVERSATIONS,
            formats=["jsonl"],
            status=Export.Status.RUNNING,
            started_at=started_at,
        )

    lost, busy = export(old), export(timezone.now())
    assert corpora.tasks.recover_exports() == [str(lost.pk)]
    assert queued == [str(lost.pk)]
    lost.refresh_from_db(), busy.refresh_from_db()
    assert lost.status == Export.Status.QUEUED and busy.status == Export.Status.RUNNING
    assert corpora.tasks.recover_exports() == []


def test_the_reconcile_runs_every_registered_step_even_when_one_fails(monkeypatch):
    calls = []
    monkeypatch.setattr(longtasks, "_RECOVERERS", {})

    @longtasks.recoverer("broken")
    def broken():
        raise RuntimeError("database away")

    @longtasks.recoverer("fine")
    def fine():
        calls.append("fine")
        return {"requeued": []}

    out = longtasks.reconcile_all()
    assert out["broken"] == {"error": "RuntimeError: database away"}
    assert out["fine"] == {"requeued": []} and calls == ["fine"]


def test_a_playground_run_left_generating_by_a_dead_worker_is_queued_again(db, monkeypatch):
    import training.tasks
    from tests.evaluation.core_fixtures import make_completed_job
    from training.models import PlaygroundRun
    from training.services import PLAYGROUND_STALE_AFTER

    queued: list[str] = []
    monkeypatch.setattr(training.tasks.run_playground, "delay", queued.append)
    job = make_completed_job()
    old = timezone.now() - PLAYGROUND_STALE_AFTER - timedelta(minutes=2)
    lost, busy = (
        PlaygroundRun.objects.create(
            job=job, prompt="Hello", status=PlaygroundRun.Status.RUNNING, started_at=started
        )
        for started in (old, timezone.now())
    )
    assert training.tasks.recover_playground_runs() == [str(lost.pk)]
    assert queued == [str(lost.pk)]
    lost.refresh_from_db(), busy.refresh_from_db()
    assert lost.status == PlaygroundRun.Status.QUEUED
    assert busy.status == PlaygroundRun.Status.RUNNING
