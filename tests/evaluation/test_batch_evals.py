"""Issue 17, batch evaluations: 30 samples over two models (the offline model and the loopback
OpenAI server) with the LLM-judged rubric; scripted judge refusals, unparseable grades,
provider errors and timeouts; aggregates with intervals (partial, then final), the model
comparison, drill-down behind every taxonomy count, exports, backpressure and cancel."""

# ruff: noqa: F811  (fixtures imported from other modules are redefined as arguments)
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest

from config import backpressure
from config.roles import Role
from evaluation.evals import services
from evaluation.models import BatchEval, EvalRun
from jobs.batch.models import BatchJob
from jobs.batch.services import TASK_MAX_ATTEMPTS, task_run
from tests.conftest import assert_envelope
from tests.evaluation.test_eval_api import jsonl, upload
from tests.jobs.openai_server import (  # noqa: F401
    Fault,
    OpenAIServer,
    fast_gateway,
    loopback_model,
    openai_server,
)

REPO = Path(__file__).resolve().parents[2]
OFFLINE = "offline/smollm2-135m-instruct"
JUDGE_SYSTEM = "You grade answers"
FAULTS = {3: "REFUSE", 7: "GARBLE", 11: "BADREQ", 17: "SLOW", 23: "REFUSE"}


def samples() -> list[dict]:
    rows = []
    for i in range(30):
        tag = FAULTS.get(i, "")
        fact = f"Item {i} is stored in bin {i % 7}."
        rows.append(
            {
                "id": f"s{i}",
                "input": f"{tag} Item {i} is stored in bin {i % 7}.".strip(),
                "reference": fact,
                "contexts": [fact, "Bins are numbered from zero."],
                "metadata": {"i": i},
            }
        )
    return rows


def _answer(text: str, body: dict) -> dict:
    reply = OpenAIServer.completion(body)
    reply["choices"][0]["message"]["content"] = text
    return reply


@pytest.fixture
def engineer(api_as):
    return api_as(Role.ENGINEER, scheme="Bearer")


@pytest.fixture
def scripted(openai_server, loopback_model, fast_gateway):
    """The loopback server answers the judge with a grade (or a refusal / garble, by the
    sample's tag) and fails answering calls for BADREQ (400) and SLOW (timeout) samples."""
    from jobs.models import GatewaySettings

    conf = GatewaySettings.load()
    conf.retry_attempts = 1
    conf.save()
    provider = loopback_model.provider
    provider.timeout_s = 0.3
    provider.save()

    def next_fault(path):
        body = openai_server.requests[-1].body
        text = json.dumps(body.get("messages", []))
        if JUDGE_SYSTEM in text:
            if "REFUSE" in text:
                return Fault(200, body=_answer("I cannot grade this answer, sorry.", body))
            if "GARBLE" in text:
                return Fault(200, body=_answer("Looks mostly fine to me.", body))
            return Fault(200, body=_answer('{"score": 4, "reason": "supported"}', body))
        if "BADREQ" in text:
            return Fault(400, body={"error": {"message": "bad request", "type": "invalid"}})
        if "SLOW" in text:
            return Fault("timeout", delay=0.6)
        return None

    openai_server._next_fault = next_fault
    return loopback_model


@pytest.fixture
def offline_model(settings):
    settings.TRAINING_MODEL_CACHE = os.environ.get(
        "CRUCIBLE_MODEL_CACHE", str(REPO / "var" / "models")
    )
    settings.GATEWAY_OFFLINE_DEVICE = "cpu"
    return OFFLINE


@pytest.fixture
def second_loopback(scripted):
    """A second chat model on the loopback provider (the fast variant's baseline)."""
    from jobs.models import RegisteredModel

    return RegisteredModel.objects.create(
        provider=scripted.provider,
        remote_id="test-chat-b",
        key=f"{scripted.provider.slug}/test-chat-b",
        display_name="Loopback B",
        price_input_per_m=1,
        price_output_per_m=2,
        price_source="admin",
        capabilities=["chat"],
    ).key


@pytest.mark.slow
def test_30_samples_offline_and_loopback_models(engineer, scripted, offline_model):
    """The acceptance run: the offline model (in-process SmolLM2) and the loopback endpoint."""
    _run_30(engineer, scripted.key, offline_model)


def test_30_samples_two_loopback_models(engineer, scripted, second_loopback):
    """The same run with a second loopback model as the baseline (fast, every CI run)."""
    _run_30(engineer, scripted.key, second_loopback)


def _run_30(engineer, loop: str, OFFLINE: str) -> None:
    response = upload(engineer, "bins", jsonl(samples()))
    assert response.status_code == 201, response.content
    dataset = response.json()
    created = engineer.post(
        "/v1/batch-evals",
        json={
            "dataset": dataset["id"],
            "models": [OFFLINE, loop],
            "rubric": "grounded_qa_judged",
            "judge_model": loop,
            "embed_model": None,
            "decoding": {"max_tokens": 8},
        },
    )
    assert created.status_code == 202, created.content
    batch_id = created.json()["id"]
    assert created.json()["status"] == "queued" and created.json()["items"] == 60
    batch = BatchEval.objects.get(pk=batch_id)

    # Partial: a few items, then the aggregates show progress and a running status.
    # It is a batch job of kind 'eval': one engine task per item, each item tied to its task.
    job = batch.job
    assert job.kind == "eval" and job.task_count == 60 and job.tasks.count() == 60
    assert not batch.items.filter(task__isnull=True).exists()
    first = list(
        batch.items.order_by("sample_index", "model_key").values_list("task_id", flat=True)[:4]
    )
    for task_id in first:
        assert task_run(task_id=task_id, dispatch=False, finish=False) in ("succeeded", "failed")
        # Running it again (a redelivered message) finds nothing to do: one result a task.
        assert task_run(task_id=task_id, dispatch=False, finish=False) is None
    partial = engineer.get(f"/v1/batch-evals/{batch_id}").json()
    assert partial["status"] == "running"
    assert partial["progress"]["done"] == 4 and partial["aggregates"]["final"] is False

    services.batch_eval_run_inline(batch=batch)
    body = engineer.get(f"/v1/batch-evals/{batch_id}").json()
    assert body["status"] == "completed", body.get("error")
    assert body["progress"] == {"done": 60, "total": 60, "percent": 100.0}
    agg = body["aggregates"]
    assert agg["final"] is True
    overall = agg["overall"]
    pr = overall["pass_rate"]
    assert pr["n"] > 0 and pr["ci_low"] <= pr["rate"] <= pr["ci_high"]
    assert pr["ci_method"].startswith("Wilson")
    corr = overall["dimensions"]["correctness"]
    assert corr["ci_low"] is not None and corr["ci_low"] <= corr["mean"] <= corr["ci_high"]
    assert sum(b["count"] for b in corr["histogram"]) == corr["n"]
    assert (
        overall["latency_ms"]["p50"] <= overall["latency_ms"]["p95"] <= overall["latency_ms"]["p99"]
    )
    assert overall["tokens"]["prompt"] > 0 and float(overall["cost"]) > 0

    # The taxonomy: every scripted class counted on the loopback model.
    lf = agg["models"][loop]["failures"]
    assert lf["judge_refusal"] >= 2 and lf["invalid_output"] >= 1
    assert lf["provider_error"] == 1 and lf["timeout"] == 1
    # Retry semantics (the engine's): the timed-out item was tried TASK_MAX_ATTEMPTS times.
    slow = EvalRun.objects.get(batch_id=batch_id, model_key=loop, sample_index=17)
    assert slow.failure == "timeout" and slow.attempts == TASK_MAX_ATTEMPTS
    assert slow.task.status == "failed" and slow.task.error_code == "timeout"
    assert slow.task.attempts == TASK_MAX_ATTEMPTS
    bad = EvalRun.objects.get(batch_id=batch_id, model_key=loop, sample_index=11)
    assert bad.failure == "provider_error" and bad.attempts == 1  # permanent: no retry
    refused = EvalRun.objects.get(batch_id=batch_id, model_key=loop, sample_index=3)
    assert refused.judge["model"] == loop and refused.judge["prompt"][0]["content"].startswith(
        JUDGE_SYSTEM
    )

    # Drill-down: the items behind each count, per model and overall.
    for model, summary in [(None, overall), *agg["models"].items()]:
        for failure, count in summary["failures"].items():
            params = f"failure={failure}" + (f"&model={model}" if model else "")
            listed = engineer.get(f"/v1/batch-evals/{batch_id}/samples?{params}&limit=1000")
            data = listed.json()
            assert data["total"] == count, (model, failure)
            assert all(r["failure"] == failure for r in data["data"])
            if failure != "below_threshold" and count:
                assert all(r["error"] for r in data["data"])
    hist = engineer.get(
        f"/v1/batch-evals/{batch_id}/samples?dimension=correctness&bin_low=0.9&bin_high=1.0"
    ).json()
    assert hist["total"] == corr["histogram"][-1]["count"]

    # Comparison: loopback minus offline, with intervals.
    (cmp,) = agg["comparisons"]
    assert cmp["baseline"] == OFFLINE and cmp["model"] == loop
    d = cmp["pass_rate"]
    assert d["ci_low"] <= d["difference"] <= d["ci_high"]
    assert cmp["dimensions"]["correctness"]["n"] == 30 - len(FAULTS)  # both scored

    # Exports and the metrics snapshot.
    lines = engineer.get(f"/v1/batch-evals/{batch_id}/export?format=jsonl").content.splitlines()
    assert len(lines) == 60 and {json.loads(x)["model"] for x in lines} == {OFFLINE, loop}
    table = list(
        csv.DictReader(
            io.StringIO(
                engineer.get(f"/v1/batch-evals/{batch_id}/export?format=csv").content.decode()
            )
        )
    )
    assert len(table) == 60 and "score_correctness" in table[0]
    snap = engineer.get(f"/v1/batch-evals/{batch_id}/metrics-snapshot")
    assert json.loads(snap.content)["aggregates"]["overall"]["pass_rate"] == pr

    # Pages: detail, drill-down and run view render the stored results.
    from django.test import Client

    client = Client()
    client.force_login(engineer.user)
    page = client.get(f"/evals/batches/{batch_id}/")
    assert page.status_code == 200 and b"Failure taxonomy" in page.content
    drill = client.get(f"/evals/batches/{batch_id}/samples/?failure=timeout")
    assert drill.status_code == 200 and str(slow.pk).encode() in drill.content


def test_backpressure_refuses_with_503_and_retry_after(engineer, monkeypatch, settings, db):
    from jobs.models import RegisteredModel

    assert RegisteredModel.objects.filter(key=OFFLINE).exists()
    dataset = upload(engineer, "bp", jsonl(samples()[:2])).json()
    settings.BATCH_QUEUE_LIMIT = 5
    monkeypatch.setattr(backpressure, "queue_depth", lambda queue: 9)
    response = engineer.post(
        "/v1/batch-evals",
        json={"dataset": dataset["id"], "models": [OFFLINE], "rubric": "grounded_qa"},
    )
    error = assert_envelope(response, 503, "queue_full")
    assert response["Retry-After"] == str(settings.BATCH_QUEUE_RETRY_AFTER_S)
    assert error["details"] == {"queue": "long", "depth": 9, "limit": 5}
    assert (
        not BatchEval.objects.exists() and not EvalRun.objects.filter(batch__isnull=False).exists()
    )


def test_filesystem_queue_depth_counts_the_queue_files(tmp_path, settings):
    settings.CELERY_BROKER_URL = "filesystem://localhost//"
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"data_folder_in": str(tmp_path)}
    for i in range(3):
        (tmp_path / f"1_{i}.long.msg").write_text("{}")
    (tmp_path / "1_9.control.msg").write_text("{}")
    assert backpressure.queue_depth("long") == 3 and backpressure.queue_depth("control") == 1


def test_bad_batch_inputs_and_cancel(engineer, db):
    dataset = upload(engineer, "cx", jsonl(samples()[:3])).json()
    assert_envelope(
        engineer.post(
            "/v1/batch-evals", json={"dataset": 999, "models": [OFFLINE], "rubric": "grounded_qa"}
        ),
        422,
    )
    assert_envelope(
        engineer.post(
            "/v1/batch-evals",
            json={"dataset": dataset["id"], "models": ["x/y"], "rubric": "grounded_qa"},
        ),
        422,
    )
    assert not BatchEval.objects.exists() and not BatchJob.objects.exists()
    created = engineer.post(
        "/v1/batch-evals",
        json={"dataset": dataset["id"], "models": [OFFLINE], "rubric": "grounded_qa", "runs": 2},
    ).json()
    assert created["items"] == 6
    cancelled = engineer.post(f"/v1/batch-evals/{created['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["aggregates"]["overall"]["cancelled"] == 6
    assert_envelope(engineer.post(f"/v1/batch-evals/{created['id']}/cancel"), 422)


def test_batch_routes_authorization(anon_api, api_as, db):
    missing = "00000000-0000-0000-0000-000000000000"
    for path in [
        f"/v1/batch-evals/{missing}",
        f"/v1/batch-evals/{missing}/samples",
        f"/v1/batch-evals/{missing}/export",
        f"/v1/batch-evals/{missing}/metrics-snapshot",
    ]:
        assert_envelope(anon_api.get(path), 401)
        assert_envelope(api_as(Role.VIEWER).get(path), 404)
    assert_envelope(anon_api.post(f"/v1/batch-evals/{missing}/cancel"), 401)
    assert_envelope(api_as(Role.VIEWER).post(f"/v1/batch-evals/{missing}/cancel"), 403)
