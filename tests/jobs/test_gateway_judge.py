"""The LLM judge through the model gateway: EVALUATION_JUDGE=endpoint scores every response
with EVALUATION_JUDGE_MODEL (a registry key) against the loopback OpenAI-compatible server (the
real ``openai`` SDK); every call is one ledger row with feature "judge" and the validation run as
its subject. Also the prompt and the parsing of the judge's answer (moved from the old client)."""

# ruff: noqa: F811  (fixtures imported from core_fixtures are redefined as arguments)

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from django.contrib.contenttypes.models import ContentType

from billing.models import LlmCall
from evaluation import scoring, services
from evaluation.models import JudgeScore, RunStatus, ValidationRun
from evaluation.suites import load_suite
from jobs import services as gateway_services
from jobs.models import RegisteredModel
from tests.evaluation.core_fixtures import (  # noqa: F401
    completed_job,
    fake_pdf,
    fake_scoring,
    fast_settings,
)
from tests.jobs.openai_server import OpenAIServer

JUDGE_KEY = "judge-loop/judge-model"


@pytest.fixture
def judge_server():
    server = OpenAIServer(api_key="sk-judge-4242")
    answer = {
        d["key"]: 4
        for suite in ("emotional_intelligence", "brand_voice")
        for d in load_suite(suite).rubric["dimensions"]
    }
    plain = server.completion

    def completion(body: dict) -> dict:
        out = plain(body)
        out["choices"][0]["message"]["content"] = f"Here you go: {json.dumps(answer)}"
        out["usage"]["completion_tokens"] = 30
        return out

    server.completion = completion  # the handler looks it up on the instance
    server.models = [{"id": "judge-model", "object": "model", "owned_by": "loopback"}]
    yield server
    server.close()


@pytest.fixture
def judge_model(db, judge_server):
    provider = gateway_services.provider_create(
        slug="judge-loop", base_url=judge_server.url, api_key="sk-judge-4242"
    )
    [report] = gateway_services.registry_refresh(provider=provider)
    assert report.added == [JUDGE_KEY]
    model = RegisteredModel.objects.get(key=JUDGE_KEY)
    return gateway_services.model_update(
        model=model,
        enabled=True,
        price_input_per_m=Decimal("1.0"),
        price_output_per_m=Decimal("2.0"),
    )


def test_the_judge_calls_the_registered_model_through_the_gateway(
    completed_job, fake_scoring, fake_pdf, settings, judge_server, judge_model
):
    settings.EVALUATION_JUDGE = "endpoint"
    settings.EVALUATION_JUDGE_MODEL = JUDGE_KEY
    run = services.validation_run_create(job=completed_job, user=None, enqueue=False)
    run = services.validation_run_execute(run_id=str(run.pk))
    assert run.status == RunStatus.COMPLETED, run.error_message

    scores = JudgeScore.objects.filter(response__run=run)
    assert scores.count() == 160 and {s.judge for s in scores} == {JUDGE_KEY}
    sample = scores.first()
    assert sample.raw["model"] == JUDGE_KEY and sample.raw["request_id"]
    ei = run.metrics["emotional_intelligence"]
    assert ei["baseline_mean"] == ei["trained_mean"] == 4.0

    calls = judge_server.calls()
    # Identical prompts (same item and reply) are answered from the gateway's exact cache.
    assert 0 < len(calls) <= 160
    first = calls[0]
    assert first.body["model"] == "judge-model" and first.body["temperature"] == 0
    assert first.body["max_tokens"] == scoring.JUDGE_MAX_TOKENS
    assert first.headers["authorization"] == "Bearer sk-judge-4242"

    rows = LlmCall.objects.filter(feature="judge")
    assert rows.count() == 160  # one ledger row per call, cached ones included
    assert rows.filter(cached=False).count() == len(calls)
    run_type = ContentType.objects.get_for_model(ValidationRun)
    assert set(rows.values_list("content_type", "object_id").distinct()) == {
        (run_type.pk, str(run.pk))
    }
    assert set(rows.values_list("model", flat=True)) == {JUDGE_KEY}
    assert {r.outcome for r in rows} == {"ok"}
    uncached = rows.filter(cached=False).first()
    expected = (
        Decimal(uncached.prompt_tokens) * Decimal("1.0")
        + Decimal(uncached.completion_tokens) * Decimal("2.0")
    ) / Decimal(1_000_000)
    assert uncached.cost == expected.quantize(Decimal("0.00000001")) and uncached.cost > 0
    assert all(r.cost == 0 for r in rows.filter(cached=True))


def test_an_unpriced_judge_model_fails_the_run_with_the_gateways_message(
    completed_job, fake_scoring, fake_pdf, settings, judge_server, judge_model
):
    gateway_services.model_update(
        model=judge_model, price_input_per_m=None, price_output_per_m=None
    )
    settings.EVALUATION_JUDGE = "endpoint"
    settings.EVALUATION_JUDGE_MODEL = JUDGE_KEY
    run = services.validation_run_create(job=completed_job, user=None, enqueue=False)
    run = services.validation_run_execute(run_id=str(run.pk))
    assert run.status == RunStatus.FAILED
    assert "has no price" in run.error_message
    assert judge_server.calls() == []


def test_an_unknown_judge_model_is_named(completed_job, fake_scoring, fake_pdf, settings):
    settings.EVALUATION_JUDGE = "endpoint"
    settings.EVALUATION_JUDGE_MODEL = "nowhere/no-model"
    run = services.validation_run_create(job=completed_job, user=None, enqueue=False)
    run = services.validation_run_execute(run_id=str(run.pk))
    assert run.status == RunStatus.FAILED and "nowhere/no-model" in run.error_message


def test_judge_messages_name_every_criterion_and_both_texts():
    dims = [
        {"key": "empathy", "name": "Empathy", "description": "Warmth", "anchors": {"1": "cold"}},
        {"name": "clarity", "description": "Plain words"},
    ]
    system, user = scoring.judge_messages(
        dimensions=dims, prompt="I lost my job.", response="I'm sorry to hear that."
    )
    assert system["role"] == "system" and '"empathy", "clarity"' in system["content"]
    assert "I lost my job." in user["content"] and "I'm sorry to hear that." in user["content"]
    assert "1 = cold" in user["content"]


def test_judge_scores_come_back_as_integers():
    text = 'Scores: {"empathy": 4, "clarity": 5, "appropriateness": 3} done'
    assert scoring.parse_scores(text, ["empathy", "clarity", "appropriateness"]) == {
        "empathy": 4,
        "clarity": 5,
        "appropriateness": 3,
    }


@pytest.mark.parametrize(
    "text", ["no json here", '{"empathy": 4}', '{"empathy": 9, "clarity": 2}', '{"empathy": "x"}']
)
def test_judge_answers_that_are_not_scores_are_errors(text):
    with pytest.raises(scoring.JudgeAnswerError):
        scoring.parse_scores(text, ["empathy", "clarity"])
