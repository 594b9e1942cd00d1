"""The demo's sample work for the newer features (config/management/commands/demo_setup.py):
the narrative corpus, a knowledge base, a batch LLM job and a batch evaluation, made once on
the offline models and queued for the workers. No Celery task runs here and no model is
called: the on-commit callbacks that would enqueue the work are captured, not executed."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

from config.management.commands import demo_setup
from config.roles import Role
from corpora.models import Corpus, KnowledgeBase
from evaluation.models import BatchEval, EvalDataset, EvalRun, EvalSample
from jobs.batch.models import BatchJob, BatchTask
from jobs.models import RegisteredModel
from tests.factories import UserFactory

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.django_db


def _lines(relative: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / relative).read_text("utf-8").splitlines() if line]


def _counts() -> dict[str, int]:
    return {
        model.__name__: model.objects.count()
        for model in (
            Corpus, KnowledgeBase, BatchJob, BatchTask, EvalDataset, EvalSample, BatchEval, EvalRun,
        )
    }  # fmt: skip


@pytest.fixture
def admin():
    return UserFactory(role=Role.ADMIN)


def test_the_samples_are_made_once_with_their_sizes_and_queued_not_run(
    admin, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False) as queued:
        samples = demo_setup.demo_samples_ensure(user=admin)
    assert samples.skipped == {}
    assert set(samples.created) == {
        "narratives", "knowledge_base", "batch_job", "eval_dataset", "batch_eval",
    }  # fmt: skip
    # The build, the dispatches: enqueued after commit, so captured here and nothing ran.
    assert queued

    narratives = samples.get("narratives")
    source = _lines(demo_setup.NARRATIVES_CORPUS)
    assert narratives.name == demo_setup.NARRATIVES_CORPUS_NAME
    assert narratives.status == Corpus.Status.READY
    assert narratives.record_count == len(source) == narratives.documents.count()
    speeches = Corpus.objects.get(name=demo_setup.SAMPLE_CORPUS_NAME)

    kb = samples.get("knowledge_base")
    assert set(kb.corpora.all()) == {speeches, narratives}
    assert kb.embedding_model == demo_setup.EMBEDDING_MODEL
    assert kb.status == KnowledgeBase.Status.BUILDING and kb.version == 0  # queued, not built

    job = samples.get("batch_job")
    expected_tasks = (
        len(demo_setup.BATCH_JOB_TEXTS)
        * len(demo_setup.BATCH_JOB_FRAMEWORKS)
        * demo_setup.BATCH_JOB_RUNS
    )
    assert job.corpus == narratives and job.status == BatchJob.Status.RUNNING
    assert job.task_count == job.tasks.count() == expected_tasks
    assert [f["name"] for f in job.frozen["frameworks"]] == demo_setup.BATCH_JOB_FRAMEWORKS
    assert [m["key"] for m in job.frozen["models"]] == [demo_setup.CHAT_MODEL]
    assert job.frozen["decoding"]["max_tokens"] == demo_setup.BATCH_JOB_DECODING["max_tokens"]
    assert set(job.tasks.values_list("chunk__document__external_id", flat=True)) == set(
        demo_setup.BATCH_JOB_TEXTS
    )
    assert set(job.tasks.values_list("status", flat=True)) == {BatchTask.Status.PENDING}

    dataset = samples.get("eval_dataset")
    rows = _lines(demo_setup.EVAL_DATASET)
    assert 5 <= len(rows) <= 10
    assert dataset.name == demo_setup.EVAL_DATASET_NAME
    assert dataset.sample_count == dataset.samples.count() == len(rows)
    assert [s.input for s in dataset.samples.order_by("index")] == [r["input"] for r in rows]

    batch = samples.get("batch_eval")
    assert batch.dataset == dataset and batch.models_list == [demo_setup.CHAT_MODEL]
    assert batch.rubric == demo_setup.EVAL_RUBRIC and batch.runs == 1
    assert batch.item_count == batch.items.count() == len(rows)
    assert batch.frozen["decoding"]["max_tokens"] == demo_setup.EVAL_DECODING["max_tokens"]
    assert batch.frozen["judge_model"] is None  # the cheap, deterministic rubric
    assert batch.status == BatchEval.Status.QUEUED
    assert set(batch.items.values_list("status", flat=True)) == {EvalRun.Status.PENDING}

    # A second run (a second `make demo`) finds every sample and creates nothing.
    before = _counts()
    with django_capture_on_commit_callbacks(execute=False) as queued_again:
        again = demo_setup.demo_samples_ensure(user=admin)
    assert again.created == [] and again.skipped == {}
    assert _counts() == before
    assert queued_again == []
    for key, (obj, _) in samples.objects.items():
        assert again.get(key).pk == obj.pk


def test_demo_setup_prints_where_to_look_and_reuses_everything(
    django_capture_on_commit_callbacks,
):
    url = "http://127.0.0.1:8765"
    out = StringIO()
    with django_capture_on_commit_callbacks(execute=False):
        call_command("demo_setup", "--url", url, "--force", stdout=out)
    text = out.getvalue()
    job = BatchJob.objects.get(name=demo_setup.BATCH_JOB_NAME)
    kb = KnowledgeBase.objects.get(name=demo_setup.KNOWLEDGE_BASE_NAME)
    batch = BatchEval.objects.get(name=demo_setup.EVAL_BATCH_NAME)
    # The original output is kept; the samples follow it.
    assert f"{url}/api/v1/me" in text and "loaded now" in text
    assert "Demo samples created" in text
    assert f"{url}/batch/{job.pk}/results/" in text
    assert f"{url}/datasets/rag/?kb={kb.pk}" in text
    assert f"{url}/evals/batches/{batch.pk}/" in text
    assert f"{url}/chat/" in text

    before = _counts()
    again = StringIO()
    with django_capture_on_commit_callbacks(execute=False) as queued:
        call_command("demo_setup", "--url", url, "--force", stdout=again)
    assert _counts() == before and queued == []
    assert "already loaded" in again.getvalue() and "Demo samples already there" in again.getvalue()


def test_the_chat_curl_calls_the_openai_compatible_endpoint_with_the_token():
    command = demo_setup.chat_curl("http://127.0.0.1:8765", "abc123")
    assert "http://127.0.0.1:8765/v1/chat/completions" in command
    assert "Authorization: Bearer abc123" in command
    body = json.loads(command.split("-d '", 1)[1].rstrip("'"))
    assert body["model"] == demo_setup.CHAT_MODEL and body["messages"][0]["role"] == "user"


def test_a_sample_its_service_refuses_is_skipped_and_the_rest_is_made(
    admin, django_capture_on_commit_callbacks
):
    RegisteredModel.objects.filter(key=demo_setup.CHAT_MODEL).update(enabled=False)
    with django_capture_on_commit_callbacks(execute=False):
        samples = demo_setup.demo_samples_ensure(user=admin)
    assert set(samples.skipped) == {"batch_job", "batch_eval"}
    assert all(demo_setup.CHAT_MODEL in reason for reason in samples.skipped.values())
    assert set(samples.created) == {"narratives", "knowledge_base", "eval_dataset"}
    assert not BatchJob.objects.exists() and not BatchEval.objects.exists()
