"""Batch LLM jobs, acceptance: 4 chunks x 2 frameworks x 2 models x 5 runs on the offline model
and the loopback server; a flaky loopback server; bad input; the replication package."""

# ruff: noqa: F811  (fixtures imported from other modules are redefined as arguments)
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest
from django.contrib.contenttypes.models import ContentType
from django.db.models import Sum

from billing.models import LlmCall
from config.roles import Role
from jobs.batch import results, services
from jobs.batch.models import BatchJob, BatchTask
from tests.conftest import assert_envelope
from tests.jobs.batch_support import json_model, narratives  # noqa: F401
from tests.jobs.openai_server import (  # noqa: F401
    Fault,
    fast_gateway,
    loopback_model,
    openai_server,
)

REPO = Path(__file__).resolve().parents[2]
OFFLINE = "offline/smollm2-135m-instruct"
FRAMEWORKS = ["narrative_salience", "moral_foundations"]


@pytest.fixture
def offline_model(settings):
    settings.TRAINING_MODEL_CACHE = os.environ.get(
        "CRUCIBLE_MODEL_CACHE", str(REPO / "var" / "models")
    )
    settings.GATEWAY_OFFLINE_DEVICE = "cpu"
    return OFFLINE


def _create(corpus, models, *, chunks=4, runs=5, capture=None, **decoding):
    ids = list(corpus.chunks.order_by("pk").values_list("pk", flat=True)[:chunks])
    job = services.job_create(
        user=None,
        corpus_id=corpus.pk,
        selection={"chunk_ids": ids},
        frameworks=FRAMEWORKS,
        models=models,
        runs=runs,
        decoding=decoding or None,
    )
    return job


def _ledger(job: BatchJob):
    return LlmCall.objects.filter(
        content_type=ContentType.objects.get_for_model(BatchTask),
        object_id__in=[str(pk) for pk in job.tasks.values_list("pk", flat=True)],
    )


def _recompute(zip_bytes: bytes, tmp_path: Path) -> str:
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as zf:
        zf.extractall(tmp_path)
    folder = next(tmp_path.glob("batch-*"))
    out = subprocess.run(
        [sys.executable, "recompute.py"], cwd=folder, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_80_tasks_on_the_offline_model_and_the_loopback_server(
    narratives, json_model, offline_model, django_capture_on_commit_callbacks, tmp_path
):
    with django_capture_on_commit_callbacks(execute=False) as queued:
        job = _create(narratives, [offline_model, json_model.key], max_tokens=64, temperature=0.7)
    assert len(queued) == 1  # the dispatch, on commit
    assert job.task_count == 80 and job.tasks.count() == 80
    assert {f["name"] for f in job.frozen["frameworks"]} == set(FRAMEWORKS)
    assert all(len(f["sha256"]) == 64 for f in job.frozen["frameworks"])
    assert {m["key"] for m in job.frozen["models"]} == {offline_model, json_model.key}
    assert job.frozen["decoding"]["max_tokens"] == 64 and job.frozen["code_version"]

    summary = services.job_run_inline(job=job)
    job.refresh_from_db()
    assert summary["tasks"].get("pending", 0) == summary["tasks"].get("running", 0) == 0
    assert job.status in (BatchJob.Status.COMPLETED, BatchJob.Status.FAILED)
    assert job.finished_at is not None
    loop = job.tasks.filter(model_key=json_model.key)
    assert loop.filter(status="succeeded").count() == 40
    offline = job.tasks.filter(model_key=offline_model)
    assert offline.filter(status__in=("succeeded", "failed")).count() == 40
    # Decoded constrained to the framework's schema, the offline model's answers parse: at
    # 64 tokens (measured: 40-56 used) all 40 did here in one call each; a few may still
    # fail a value check and be repaired once.
    assert offline.filter(status="succeeded").count() >= 36
    for task in offline.filter(status="failed"):
        # The small model's invalid answers are kept raw and typed in the failure taxonomy,
        # after exactly one repair with the validation error in the prompt.
        assert task.error_code in ("invalid_json", "schema_violation")
        assert task.repairs == 1 and task.calls == 2 and task.validation_errors
    taxonomy = results.progress(job)["failure_taxonomy"]
    assert (
        sum(v for k, v in taxonomy.items() if k != "repaired_after_invalid")
        == offline.filter(status="failed").count()
    )
    # Every task has its figures; the ledger has one row per gateway call.
    for task in loop:
        assert task.prompt_tokens > 0 and task.completion_tokens > 0 and task.latency_ms
        assert task.parsed_output and task.finished_at and task.attempts == 1
    assert _ledger(job).count() == job.tasks.aggregate(n=Sum("calls"))["n"]

    snapshot = results.stats_refresh(job_id=job.pk, force=True)
    offline_rows = [r for r in snapshot.data["per_text"] if r["model"] == offline_model]
    assert len({r["unit"] for r in offline_rows}) == 4
    assert any(r["n"] >= 4 and r["ci_t_low"] is not None for r in offline_rows)
    rows = [r for r in snapshot.data["per_text"] if r["model"] == json_model.key]
    numeric = [r for r in rows if r["level"] != "nominal"]
    assert len({r["unit"] for r in rows}) == 4
    assert numeric and all(r["n"] == 5 for r in numeric)
    assert all(r["ci_t_low"] is not None and r["ci_boot_low"] is not None for r in numeric)
    assert all(r["ci_t_low"] <= r["mean"] <= r["ci_t_high"] for r in numeric)
    agreement = snapshot.data["agreement"]
    alphas = [
        a for a in agreement if a["statistic"] == "krippendorff_alpha" and a["value"] is not None
    ]
    assert alphas and all(a["n_units"] >= 2 and a["ci_low"] is not None for a in alphas)
    assert any(a["statistic"] == "ICC2" and a["value"] is None for a in agreement)  # 4 < 5 units

    package = results.replication_package(job)
    assert package == results.replication_package(job)  # byte-identical re-export
    with zipfile.ZipFile(io.BytesIO(package)) as zf:
        names = zf.namelist()
        assert names == sorted(names)
        assert {i.date_time for i in zf.infolist()} == {results.ZIP_DATE}
        prefix = names[0].split("/")[0]
        stats_csv = pd.read_csv(zf.open(f"{prefix}/per_text_stats.csv"))
        raw = pd.read_json(zf.open(f"{prefix}/raw_outputs.jsonl"), lines=True)
        tasks = pd.read_csv(zf.open(f"{prefix}/tasks.csv"))
    assert len(raw) == len(tasks) == 80
    assert len(stats_csv) == len(snapshot.data["per_text"])
    assert "OK:" in _recompute(package, tmp_path)


def test_flaky_server_every_task_completes_and_ledger_matches_attempts(
    narratives, json_model, openai_server, fast_gateway, django_capture_on_commit_callbacks
):
    """Every fifth request fails, alternating 429 (Retry-After: 2) and 500."""
    count = {"n": 0}
    original = openai_server._next_fault

    def every_fifth(path):
        count["n"] += 1
        if count["n"] % 5 == 0:
            if count["n"] % 10 == 0:
                return Fault(429, headers={"Retry-After": "2"})
            return Fault(500)
        return original(path)

    openai_server._next_fault = every_fifth
    with django_capture_on_commit_callbacks(execute=False):
        job = _create(narratives, [json_model.key], chunks=4, runs=5)
    services.job_run_inline(job=job)
    job.refresh_from_db()
    assert job.status == BatchJob.Status.COMPLETED
    assert job.tasks.filter(status="succeeded").count() == job.task_count == 40
    requests = openai_server.calls()
    failed = [r for r in requests if r.answered in ("429", "500")]
    assert len(failed) == len(requests) // 5 and failed
    # The gateway waited at least the Retry-After after each 429.
    assert sum(1 for w in fast_gateway if w >= 2) >= sum(1 for r in failed if r.answered == "429")
    ledger = _ledger(job)
    assert ledger.count() == job.tasks.aggregate(n=Sum("calls"))["n"] == 40
    assert ledger.aggregate(n=Sum("attempts"))["n"] == len(requests)


def _post(api, corpus_, **overrides):
    ids = list(corpus_.chunks.order_by("pk").values_list("pk", flat=True)[:2])
    body = {
        "corpus": str(corpus_.pk),
        "selection": {"chunk_ids": ids},
        "frameworks": FRAMEWORKS,
        "models": [OFFLINE],
        "runs": 2,
        **overrides,
    }
    return api.post("jobs", json=body)


@pytest.mark.parametrize(
    ("overrides", "status", "needle"),
    [
        ({"frameworks": ["no_such_framework"]}, 422, "Unknown framework"),
        ({"frameworks": ["narrative_salience@9.9.9"]}, 422, "Unknown framework"),
        ({"models": ["nobody/none"]}, 422, "Unknown model"),
        ({"models": []}, 422, "at least one model"),
        ({"selection": {"chunk_ids": []}}, 422, "Select texts"),
        ({"selection": {"filter": {"document_type": "poem"}}}, 422, "matches no text"),
        ({"selection": {"chunk_ids": [999999]}}, 422, "not in this corpus"),
        ({"runs": 0}, 422, "1 to 20"),
        ({"runs": 21}, 422, "1 to 20"),
        ({"decoding": {"max_tokens": 0}}, 422, "max_tokens"),
        ({"decoding": {"logit_bias": {}}}, 422, "Unknown decoding"),
        ({"corpus": "00000000-0000-0000-0000-000000000000"}, 422, "Unknown corpus"),
    ],
)
def test_bad_input_gets_a_clear_error_and_writes_nothing(
    api_as, narratives, overrides, status, needle
):
    response = _post(api_as(Role.ENGINEER), narratives, **overrides)
    error = assert_envelope(response, status)
    assert needle in error["message"], error
    assert BatchJob.objects.count() == 0 and BatchTask.objects.count() == 0


def test_a_full_batch_queue_refuses_with_503_and_retry_after(
    api_as, narratives, settings, monkeypatch
):
    from config import backpressure

    settings.BATCH_QUEUE_LIMIT = 100
    monkeypatch.setattr(backpressure, "queue_depth", lambda queue: 100 if queue == "long" else 0)
    response = _post(api_as(Role.ENGINEER), narratives)
    error = assert_envelope(response, 503, "queue_full")
    assert response["Retry-After"] == str(settings.BATCH_QUEUE_RETRY_AFTER_S)
    assert error["details"] == {"queue": "long", "depth": 100, "limit": 100}
    assert BatchJob.objects.count() == 0 and BatchTask.objects.count() == 0
    # Bad input is still named first: a full queue is no reason to hide it.
    assert_envelope(_post(api_as(Role.ENGINEER), narratives, runs=0), 422)


def test_over_budget_is_refused_and_writes_nothing(api_as, narratives, json_model):
    from billing.services import budget_set

    json_model.price_input_per_m = Decimal("500000")
    json_model.save()
    budget_set(user=None, amount=Decimal("1.00"))
    api = api_as(Role.ENGINEER)
    estimate = _post(api, narratives, models=[json_model.key], runs=5)
    assert_envelope(estimate, 409, "budget_exceeded")
    assert BatchJob.objects.count() == 0 and BatchTask.objects.count() == 0
    plan = api.post(
        "jobs/estimate",
        json={
            "corpus": str(narratives.pk),
            "selection": {"chunk_ids": [narratives.chunks.first().pk]},
            "frameworks": FRAMEWORKS,
            "models": [json_model.key],
            "runs": 5,
        },
    )
    assert plan.status_code == 200 and plan.json()["budget"]["fits"] is False
    assert plan.json()["tasks"] == 10


def test_api_create_list_get_and_control(
    api_as, narratives, json_model, django_capture_on_commit_callbacks
):
    api = api_as(Role.ENGINEER)
    with django_capture_on_commit_callbacks(execute=False) as queued:
        response = _post(api, narratives, models=[json_model.key], runs=3, name="API job")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["task_count"] == 2 * 2 * 1 * 3 and body["status"] == "running"
    assert body["progress"]["by_status"] == {"pending": 12}
    assert len(queued) == 1
    job_id = body["id"]
    listed = api.get("jobs").json()
    assert [j["id"] for j in listed] == [job_id] and listed[0]["finished"] == 0
    # Money in fixed-point notation, as read from the 8-decimal column (not "0E-8").
    assert listed[0]["cost"] == "0" and "E" not in listed[0]["estimate_cost"]
    Decimal(listed[0]["estimate_cost"])  # still a decimal string
    assert api.get(f"jobs/{job_id}").json()["parameters_sha256"] == body["parameters_sha256"]
    assert api.post(f"jobs/{job_id}/pause").json()["status"] == "paused"
    assert_envelope(api.post(f"jobs/{job_id}/pause"), 409)
    with django_capture_on_commit_callbacks(execute=False):
        assert api.post(f"jobs/{job_id}/resume").json()["status"] == "running"
    assert api.post(f"jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert BatchTask.objects.filter(job_id=job_id, status="cancelled").count() == 12
    assert_envelope(api.post(f"jobs/{job_id}/resume"), 409)
    assert_envelope(api.get("jobs/00000000-0000-0000-0000-000000000000"), 404)


def test_openai_batch_files_match_by_custom_id(
    narratives, json_model, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False):
        job = _create(narratives, [json_model.key], chunks=2, runs=2)
    services.job_run_inline(job=job)
    requests = list(services.openai_batch_requests(job=job))
    outputs = list(services.openai_batch_results(job=job))
    assert len(requests) == len(outputs) == 8
    first = json.loads(requests[0])
    assert set(first) == {"custom_id", "method", "url", "body"}
    assert first["method"] == "POST" and first["url"] == "/v1/chat/completions"
    assert first["body"]["model"] == "test-chat" and first["body"]["messages"]
    pairs = services.openai_batch_match(requests, list(reversed(outputs)))  # order ignored
    for request, output in pairs:
        assert output["custom_id"] == request["custom_id"]
        task = BatchTask.objects.get(pk=request["custom_id"])
        assert output["response"]["body"]["choices"][0]["message"]["content"] == task.raw_output
        assert output["error"] is None


def test_run_batch_command_creates_runs_resumes_and_exports(narratives, json_model, tmp_path):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    out = io.StringIO()
    call_command(
        "run_batch",
        "--corpus",
        str(narratives.pk),
        "--frameworks",
        "moral_foundations",
        "--models",
        json_model.key,
        "--runs",
        "2",
        "--documents",
        "jfk-inaugural",
        "--estimate-only",
        stdout=out,
    )
    assert "tasks: 2" in out.getvalue() and BatchJob.objects.count() == 0
    out = io.StringIO()
    call_command(
        "run_batch",
        "--corpus",
        str(narratives.pk),
        "--frameworks",
        "moral_foundations",
        "--models",
        json_model.key,
        "--runs",
        "2",
        "--documents",
        "jfk-inaugural",
        "--no-progress",
        stdout=out,
    )
    job = BatchJob.objects.get()
    assert "completed" in out.getvalue() and job.status == "completed"
    # A crashed claim: the task looks running with a stale heartbeat; resume runs only it.
    task = job.tasks.first()
    BatchTask.objects.filter(pk=task.pk).update(status="running", heartbeat_at=None, raw_output="")
    BatchJob.objects.filter(pk=job.pk).update(status="running")
    calls_before = _ledger(job).count()
    call_command("run_batch", str(job.pk), "--no-progress", stdout=io.StringIO())
    task.refresh_from_db()
    assert task.status == "succeeded" and task.raw_output and task.attempts == 2
    assert _ledger(job).count() == calls_before + 1  # only that task ran again
    path = tmp_path / "requests.jsonl"
    call_command("run_batch", str(job.pk), "--export-requests", str(path), stdout=io.StringIO())
    assert len(path.read_text().splitlines()) == 2
    with pytest.raises(CommandError, match="Unknown model"):
        call_command(
            "run_batch",
            "--corpus",
            str(narratives.pk),
            "--frameworks",
            "moral_foundations",
            "--models",
            "x/y",
            "--all",
        )


def test_task_creation_memory_is_flat_and_ids_are_deterministic(narratives):
    import tracemalloc

    from jobs.batch.models import FrameworkVersion

    services.framework_sync()
    fw = FrameworkVersion.objects.select_related("framework").first()
    chunk = narratives.chunks.first()
    peaks = {}
    for size in (2_000, 20_000):
        job = BatchJob.objects.create(name=f"{size}", corpus=narratives, runs=1, task_count=size)
        rows = (
            BatchTask(
                id=services.task_id(job.pk, chunk.pk, fw.label, f"m/{i // 20}", i % 20 + 1),
                job=job,
                chunk=chunk,
                framework_version=fw,
                model_key=f"m/{i // 20}",
                run=i % 20 + 1,
            )
            for i in range(size)
        )
        tracemalloc.start()
        assert services.tasks_bulk_create(rows) == size
        peaks[size] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert job.tasks.count() == size
    # Ten times the tasks, about the same memory: one batch of rows is held at a time.
    assert peaks[20_000] < 1.5 * peaks[2_000] + 2**20, peaks
    assert services.task_id("j", 1, "f@1", "m", 1) == services.task_id("j", 1, "f@1", "m", 1)
    assert services.task_id("j", 1, "f@1", "m", 1) != services.task_id("j", 1, "f@1", "m", 2)


def test_a_task_runs_once_however_often_it_is_delivered(
    narratives, json_model, django_capture_on_commit_callbacks
):
    from django.db import IntegrityError, transaction

    with django_capture_on_commit_callbacks(execute=False):
        job = _create(narratives, [json_model.key], chunks=1, runs=1)
    task = job.tasks.first()
    BatchTask.objects.filter(pk=task.pk).update(status="queued")
    assert services.task_run(task_id=task.pk, dispatch=False) == "succeeded"
    assert services.task_run(task_id=task.pk, dispatch=False) is None  # a second delivery
    assert _ledger(job).count() == 1
    with pytest.raises(IntegrityError), transaction.atomic():
        BatchTask.objects.create(
            id="tduplicate",
            job=job,
            chunk=task.chunk,
            framework_version=task.framework_version,
            model_key=task.model_key,
            run=task.run,
        )


def test_replication_package_recomputes_the_same_numbers(
    narratives, json_model, django_capture_on_commit_callbacks, tmp_path
):
    with django_capture_on_commit_callbacks(execute=False):
        job = _create(narratives, [json_model.key], chunks=6, runs=3)
    services.job_run_inline(job=job)
    snapshot = results.stats_refresh(job_id=job.pk, force=True)
    icc = [a for a in snapshot.data["agreement"] if a["statistic"] == "ICC2"]
    assert icc and all(a["value"] is not None and a["n_units"] == 6 for a in icc)
    package = results.replication_package(job)
    assert package == results.replication_package(job)
    out = _recompute(package, tmp_path)
    assert "OK:" in out and "agreement.csv" in out
