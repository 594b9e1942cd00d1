"""Crash recovery with a real Celery worker: SIGKILL it in the middle of a 2,000-task job on the
loopback server, reconcile, start another: exactly 2,000 results, none computed twice (the
ledger), none missing."""

# ruff: noqa: F811
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.contrib.contenttypes.models import ContentType
from django.db.models import Count

from billing.models import LlmCall
from config.celery import app
from jobs.batch import services
from jobs.batch.models import BatchJob, BatchTask
from jobs.models import RegisteredModel
from tests.jobs.batch_support import json_completion, narratives  # noqa: F401
from tests.jobs.openai_server import fast_gateway, loopback_model, openai_server  # noqa: F401
from tests.workers import (
    assert_ledger_covers_server_calls,
    database_url,
    reset_broker_pools,
    wait_until,
)

ROOT = Path(django_settings.BASE_DIR)
CELERY = Path(sys.executable).parent / "celery"


@pytest.fixture
def worker(tmp_path, settings):
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
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": database_url(),
        "CELERY_BROKER_DIR": str(broker),
        "LONG_TASK_STALE_AFTER_S": "3",
        "BATCH_LIVE_STATS": "0",
        "PYTHONPATH": str(ROOT),
    }
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        log = tmp_path / f"worker-{len(started)}.log"
        proc = subprocess.Popen(
            [
                str(CELERY),
                "-A",
                "config.celery",
                "worker",
                "-Q",
                "long,control",
                "-c",
                "2",
                "-n",
                f"batch{len(started)}-{uuid.uuid4().hex[:6]}@%h",
                "--loglevel=WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=ROOT,
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append(proc)
        proc.log = log
        return proc

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


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_sigkill_mid_job_then_restart_gives_exactly_2000_results(
    worker, narratives, openai_server, loopback_model, fast_gateway
):
    openai_server.completion = json_completion
    keys = [loopback_model.key]
    for i in range(2, 6):
        extra = RegisteredModel.objects.create(
            provider=loopback_model.provider,
            remote_id=f"test-chat-{i}",
            key=f"{loopback_model.provider.slug}/test-chat-{i}",
            price_input_per_m=1,
            price_output_per_m=2,
            price_source="admin",
            capabilities=["chat"],
        )
        keys.append(extra.key)
    chunk_ids = list(narratives.chunks.order_by("pk").values_list("pk", flat=True)[:20])
    job = services.job_create(
        user=None,
        corpus_id=narratives.pk,
        selection={"chunk_ids": chunk_ids},
        frameworks=["narrative_salience", "moral_foundations"],
        models=keys,
        runs=10,
        decoding={"max_tokens": 64},
    )  # the dispatch is enqueued on commit
    assert job.task_count == 2000 == job.tasks.count()

    first = worker()
    done = lambda: job.tasks.filter(status="succeeded").count()  # noqa: E731
    wait_until(lambda: done() >= 500, 1200, "500 tasks to finish")
    os.killpg(first.pid, signal.SIGKILL)  # the worker and its pool, as an OOM kill would
    first.wait(timeout=10)
    at_kill = done()
    assert at_kill < 2000
    time.sleep(3.5)  # the killed worker's claims go stale
    recovered = services.batch_reconcile()  # what the beat's reconcile runs every minute
    second = worker()
    wait_until(
        lambda: BatchJob.objects.get(pk=job.pk).status == "completed",
        2400,  # a shared two-core CI runner managed about 2 tasks/s
        f"the job to complete (recovered {recovered}, {done()} done)",
        interval=1,
    )
    assert done() == 2000 and job.tasks.exclude(status="succeeded").count() == 0
    ledger = LlmCall.objects.filter(content_type=ContentType.objects.get_for_model(BatchTask))
    computed = ledger.filter(cached=False)
    # Every call that reached the server is in the ledger, the calls in flight at the kill
    # included (written ahead, settled by the reconcile).
    assert_ledger_covers_server_calls(computed, len(openai_server.calls()))
    assert not ledger.filter(outcome="in_flight").exists()
    # None computed twice: one answered provider call per task. A call the kill interrupted
    # after its answer reached the cache settled as answered, and its task's rerun was a
    # cache hit; one interrupted before that settled as lost (at most one per worker
    # process), and its task asked again.
    answered = computed.filter(outcome="ok").values("object_id").annotate(n=Count("pk"))
    assert answered.count() == 2000 and max(r["n"] for r in answered) == 1
    lost = computed.exclude(outcome="ok")
    assert lost.count() <= 2, list(lost.values("object_id", "outcome"))
    assert set(lost.values_list("outcome", flat=True)) <= {"error:worker_lost"}
    assert second.poll() is None, second.log.read_text()[-2000:]
