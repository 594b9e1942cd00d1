"""Batch evaluations on the batch engine: a batch evaluation is a batch job of kind 'eval',
so the engine's guarantees hold for it: one result per task however often a task runs, a lost
worker's claims recovered and rerun, failures outside the kind's code counted, and a real
worker SIGKILLed mid-batch leaving exactly one scored item per task."""

# ruff: noqa: F811  (fixtures imported from other modules are redefined as arguments)
from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest
from django.contrib.contenttypes.models import ContentType
from django.db.models import Count
from django.utils import timezone

from billing.models import LlmCall
from config.roles import Role
from evaluation.evals import services
from evaluation.models import BatchEval, EvalDataset, EvalRun
from jobs.batch import services as engine
from jobs.batch.models import BatchJob, BatchTask
from tests.conftest import assert_envelope
from tests.jobs.openai_server import fast_gateway, loopback_model, openai_server  # noqa: F401
from tests.jobs.test_batch_worker_kill import worker  # noqa: F401
from tests.workers import assert_ledger_covers_server_calls, wait_until


def _dataset(n: int) -> EvalDataset:
    import io
    import json

    from evaluation.evals.datasets import dataset_create

    rows = [
        {
            "input": f"Where is item {i}?",
            "reference": f"Item {i} is in bin {i % 7}.",
            "contexts": [f"Item {i} is in bin {i % 7}."],
        }
        for i in range(n)
    ]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return dataset_create(user=None, name=f"bins{n}", stream=io.BytesIO(body))


def _batch(model: str, n: int = 4, *, enqueue: bool = False, runs: int = 1) -> BatchEval:
    return services.batch_eval_create(
        user=None,
        dataset_id=_dataset(n).pk,
        models=[model],
        rubric="grounded_qa",
        runs=runs,
        embed_model=None,
        decoding={"max_tokens": 16},
        enqueue=enqueue,
    )


@pytest.mark.django_db
def test_an_eval_batch_is_an_eval_job_with_one_task_per_item(loopback_model, fast_gateway):
    batch = _batch(loopback_model.key, 3, runs=2)
    job = batch.job
    assert job.kind == "eval" and job.corpus_id is None and job.task_count == 6
    assert job.frozen["evaluation"]["rubric"]["name"] == "grounded_qa"
    assert [m["key"] for m in job.frozen["models"]] == [loopback_model.key]
    assert batch.frozen["job"] == str(job.pk)
    pairs = set(batch.items.values_list("task_id", "task__item_id"))
    assert len(pairs) == 6 and {item for _, item in pairs} == set(
        batch.dataset.samples.values_list("pk", flat=True)
    )
    # The task ids are deterministic: the same job, item, rubric, model and run give the same id.
    task = job.tasks.order_by("pk").first()
    label = f"{batch.rubric}@{batch.rubric_version}"
    assert task.pk == engine.task_id(
        job.pk, f"item:{task.item_id}", label, task.model_key, task.run
    )

    services.batch_eval_run_inline(batch=batch)
    assert batch.status == "completed"
    assert job.tasks.filter(status="succeeded").count() == 6
    for item in batch.items.select_related("task"):
        assert item.status in ("succeeded", "failed") and item.attempts == item.task.attempts == 1
        assert item.task.raw_output == item.output
        assert item.task.parsed_output["scores"] == item.scores
        assert item.task.prompt_tokens == item.prompt_tokens > 0


@pytest.mark.django_db
def test_a_lost_worker_s_item_reruns_once_and_a_task_run_twice_keeps_one_result(
    loopback_model, fast_gateway, openai_server, settings
):
    batch = _batch(loopback_model.key, 2)
    BatchJob.objects.filter(pk=batch.job_id).update(status="running")
    first, second = batch.items.order_by("sample_index").select_related("task")
    # A worker claimed the first task and died: its heartbeat is old.
    BatchTask.objects.filter(pk=first.task_id).update(
        status="running",
        claimed_by="dead-worker",
        attempts=1,
        heartbeat_at=timezone.now() - timedelta(hours=1),
    )
    assert engine.tasks_recover(job_id=batch.job_id)["reclaimed"] == 1
    assert engine.task_run(task_id=first.task_id, dispatch=False, finish=False) == "succeeded"
    assert engine.task_run(task_id=first.task_id, dispatch=False, finish=False) is None
    first.refresh_from_db()
    assert first.status == "succeeded" and first.attempts == 2
    assert EvalRun.objects.filter(task_id=first.task_id).count() == 1

    # The second is lost on every try: the reconcile fails it and the kind records why.
    BatchTask.objects.filter(pk=second.task_id).update(
        status="running",
        claimed_by="dead-worker",
        attempts=engine.TASK_MAX_ATTEMPTS,
        heartbeat_at=timezone.now() - timedelta(hours=1),
    )
    assert engine.tasks_recover(job_id=batch.job_id)["failed"] == 1
    second.refresh_from_db()
    assert second.status == "failed" and second.failure == "platform_error"
    assert second.error_message.startswith("worker_lost")
    assert engine.job_finish_if_done(batch.job_id)
    batch.refresh_from_db()
    assert batch.status == "completed"
    assert batch.aggregates["overall"]["failures"]["platform_error"] == 1


@pytest.mark.django_db
def test_a_crash_inside_scoring_fails_the_item_as_a_platform_error(
    loopback_model, fast_gateway, monkeypatch
):
    batch = _batch(loopback_model.key, 2)

    def broken(*args, **kwargs):
        raise RuntimeError("scorer bug")

    monkeypatch.setattr(services, "produce_and_score", broken)
    services.batch_eval_run_inline(batch=batch)
    assert batch.status == "failed"  # no item was scored
    items = list(batch.items.select_related("task"))
    assert {i.failure for i in items} == {"platform_error"}
    assert all(
        "internal_error" in i.error_message and "scorer bug" in i.error_message for i in items
    )
    assert {i.task.error_code for i in items} == {"internal_error"}


@pytest.mark.django_db
def test_transient_errors_retry_on_the_engine_honouring_retry_after(
    loopback_model, fast_gateway, openai_server
):
    batch = _batch(loopback_model.key, 1)
    # The gateway's own tries (4) all get 429 once, so the task is retried by the engine.
    for _ in range(4):
        openai_server.fail(429, headers={"Retry-After": "1"})
    started = time.monotonic()
    services.batch_eval_run_inline(batch=batch)
    (item,) = batch.items.select_related("task")
    assert item.status == "succeeded" and item.task.attempts == 2
    assert time.monotonic() - started >= 1.0  # the task waited out the Retry-After
    assert batch.status == "completed"


@pytest.mark.django_db
def test_eval_jobs_are_not_framework_jobs(loopback_model, fast_gateway, api_as):
    batch = _batch(loopback_model.key, 1)
    engineer = api_as(Role.ENGINEER)
    listed = engineer.get("/api/v1/jobs").json()
    rows = listed["data"] if isinstance(listed, dict) else listed
    assert str(batch.job_id) not in {r["id"] for r in rows}
    assert_envelope(engineer.get(f"/api/v1/jobs/{batch.job_id}"), 404)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_sigkill_mid_batch_evaluation_then_restart_scores_each_item_once(
    worker, openai_server, loopback_model, fast_gateway
):
    openai_server.latency = 0.05
    batch = _batch(loopback_model.key, 40, enqueue=True, runs=2)  # dispatched on commit
    job = batch.job
    first = worker()
    done = lambda: batch.items.filter(status__in=("succeeded", "failed")).count()  # noqa: E731
    wait_until(lambda: done() >= 20, 600, "20 items to be scored")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    assert done() < 80
    time.sleep(3.5)  # the killed worker's claims go stale
    engine.batch_reconcile()
    second = worker()
    wait_until(
        lambda: BatchEval.objects.get(pk=batch.pk).status == "completed",
        900,
        f"the batch evaluation to complete ({done()} done)",
        interval=1,
    )
    assert job.tasks.filter(status="succeeded").count() == 80
    assert batch.items.filter(status="succeeded").count() == 80
    ledger = LlmCall.objects.filter(content_type=ContentType.objects.get_for_model(BatchTask))
    computed = ledger.filter(cached=False)
    assert_ledger_covers_server_calls(computed, len(openai_server.calls()))
    assert not ledger.filter(outcome="in_flight").exists()
    answered = computed.filter(outcome="ok").values("object_id").annotate(n=Count("pk"))
    assert answered.count() == 80 and max(r["n"] for r in answered) == 1
    assert second.poll() is None, second.log.read_text()[-2000:]
