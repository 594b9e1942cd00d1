"""The Celery app: conventions, beat schedule, and a real round trip through the broker."""

import pytest
from celery.contrib.testing.worker import start_worker
from django.core.cache import cache
from django_celery_results.models import TaskResult

from config.celery import app
from config.logging import bind_context, clear_context, current_request_id
from config.tasks import WORKER_HEARTBEAT_KEY, last_worker_heartbeat, worker_heartbeat


@app.task(name="tests.echo_request_id")
def echo_request_id(value):
    return {"value": value, "request_id": current_request_id()}


def test_conventions():
    conf = app.conf
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert 0 < conf.task_soft_time_limit < conf.task_time_limit
    assert conf.result_backend == "django-db"
    assert "worker-heartbeat" in conf.beat_schedule
    assert conf.beat_schedule["worker-heartbeat"]["task"] in app.tasks


@pytest.mark.django_db
def test_worker_heartbeat_records_the_time():
    cache.delete(WORKER_HEARTBEAT_KEY)
    assert last_worker_heartbeat() is None
    worker_heartbeat()
    assert last_worker_heartbeat() is not None


def _reset_connection_pools():
    """Producers cached by earlier .delay() calls would keep the old broker folder."""
    from kombu import pools

    app.pool.force_close_all()
    app._pool = None
    app.amqp._producer_pool = None
    pools.reset()  # kombu's process-wide producer pools hold the old connections too


@pytest.fixture
def isolated_broker(tmp_path):
    """Filesystem broker in a temporary folder (the configured Redis broker is used as is)."""
    original = dict(app.conf.broker_transport_options)
    _reset_connection_pools()
    if app.conf.broker_url.startswith("filesystem"):
        folder = str(tmp_path / "queue")
        app.conf.broker_transport_options = {
            **original,
            "data_folder_in": folder,
            "data_folder_out": folder,
            "processed_folder": str(tmp_path / "processed"),
        }
        (tmp_path / "queue").mkdir()
        (tmp_path / "processed").mkdir()
        app.conf.broker_transport_options["control_folder"] = str(tmp_path / "control")
        (tmp_path / "control").mkdir()
    else:
        # CI's Redis database is the suite's own: drop what earlier tests queued (job
        # notifications, exports) so the worker sees this test's task at once.
        app.control.purge()
    yield
    app.conf.broker_transport_options = original
    _reset_connection_pools()


@pytest.mark.django_db(transaction=True)
def test_round_trip_through_the_broker_with_the_request_id(isolated_broker):
    with start_worker(app, perform_ping_check=False, shutdown_timeout=20):
        bind_context(request_id="req-celery-1", user="ada")
        try:
            result = echo_request_id.delay(41)
        finally:
            clear_context()
        assert result.get(timeout=30) == {"value": 41, "request_id": "req-celery-1"}
    stored = TaskResult.objects.get(task_id=result.id)
    assert stored.status == "SUCCESS" and stored.task_name == "tests.echo_request_id"
