"""The public /v1/ API shares /api/v1/'s mechanism (config.api.CrucibleAPI): the error envelope
for every failure the parser and Django raise, Retry-After on 429, and an OpenAPI document that
lists every status an operation answers and states every constraint its handlers enforce.
Regression tests for what schemathesis found on /v1/ (tests/config/test_fuzz.py)."""

from __future__ import annotations

import uuid

import pytest
from django.test import Client, override_settings

from config.roles import Role
from jobs.models import ChatResponse
from tests.conftest import assert_envelope

pytestmark = pytest.mark.django_db

BASE = "offline/smollm2-135m-instruct"
EMBED = "offline/all-minilm-l6-v2"
COMMON = {"400", "401", "413", "422", "429"}
MODEL_CALL = {"403", "404", "409", "502", "503", "504"}


@pytest.fixture
def engineer(api_as):
    return api_as(Role.ENGINEER, scheme="Bearer")


@pytest.fixture
def document():
    response = Client().get("/v1/openapi.json")
    assert response.status_code == 200
    return response.json()


def _operation(document: dict, method: str, path: str) -> dict:
    return document["paths"][path][method]


def _body_schema(document: dict, method: str, path: str) -> dict:
    ref = _operation(document, method, path)["requestBody"]["content"]["application/json"]
    name = ref["schema"]["$ref"].rsplit("/", 1)[1]
    return document["components"]["schemas"][name]


# --- The OpenAPI document --------------------------------------------------------------------------


def test_every_v1_operation_documents_the_common_errors_with_the_envelope(document):
    assert "ErrorOut" in document["components"]["schemas"]
    operations = [
        (path, method, op)
        for path, item in document["paths"].items()
        for method, op in item.items()
        if isinstance(op, dict) and "responses" in op
    ]
    assert len(operations) >= 28
    for path, method, op in operations:
        statuses = set(op["responses"])
        assert statuses >= COMMON, (method, path, statuses)
        for status in COMMON:
            schema = op["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorOut"}, (method, path)


@pytest.mark.parametrize(
    "method,path,expected",
    [
        ("post", "/v1/chat/completions", MODEL_CALL),
        ("post", "/v1/embeddings", MODEL_CALL),
        ("post", "/v1/chat", MODEL_CALL),
        ("post", "/v1/evaluate", MODEL_CALL),
        ("post", "/v1/feedback", {"403", "404"}),
        ("get", "/v1/models/{model_id}", {"404"}),
        ("get", "/v1/datasets/{dataset_id}", {"404"}),
        ("get", "/v1/evals/{run_id}", {"404"}),
        ("get", "/v1/batch-evals/{batch_id}/export", {"404"}),
        ("post", "/v1/batch-evals", {"403", "503"}),
        ("post", "/v1/rag/query", {"404", "502", "503", "504"}),
    ],
)
def test_statuses_the_handlers_answer_are_documented(document, method, path, expected):
    assert expected <= set(_operation(document, method, path)["responses"])


def test_constraints_the_handlers_enforce_are_in_the_schema(document):
    chat = _body_schema(document, "post", "/v1/chat")
    assert {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}} in chat["anyOf"]
    feedback = _body_schema(document, "post", "/v1/feedback")
    assert len(feedback["anyOf"]) == 4
    query = _body_schema(document, "post", "/v1/rag/query")["properties"]["question"]
    assert query["maxLength"] == 4000 and query["pattern"] == r"\S"
    export = _operation(document, "get", "/v1/batch-evals/{batch_id}/export")["parameters"]
    assert next(p for p in export if p["name"] == "format")["schema"]["enum"] == ["jsonl", "csv"]
    history = _operation(document, "get", "/v1/evals")["parameters"]
    offset = next(p for p in history if p["name"] == "offset")["schema"]
    assert offset["minimum"] == 0 and offset["maximum"] >= 1_000_000


# --- The shared mechanism on /v1/ ------------------------------------------------------------------


def test_malformed_json_is_a_400_envelope_with_the_request_id(engineer):
    response = engineer._client.post(
        "/v1/chat", data="{not json", content_type="application/json", headers=engineer._headers
    )
    error = assert_envelope(response, 400)
    assert error["request_id"] == response["X-Request-ID"]


def test_a_json_array_body_is_refused_with_the_documented_400(engineer):
    response = engineer.post("/v1/chat", json=[{"model": BASE, "prompt": "hi"}])
    assert_envelope(response, 400, "bad_request")
    assert not ChatResponse.objects.exists()


def test_a_body_over_the_limit_is_a_413_envelope(engineer, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = engineer.post("/v1/chat", json={"model": BASE, "prompt": "x" * 2000})
    error = assert_envelope(response, 413, "payload_too_large")
    assert error["details"]["limit_bytes"] == 1000


@override_settings(API_RATE_LIMIT="1/m")
def test_429_carries_retry_after_on_both_apis(api_as):
    for prefix, path in (("/v1/", "models"), ("/api/v1/", "me")):
        client = api_as(Role.VIEWER)
        assert client.get(prefix + path).status_code == 200
        response = client.get(prefix + path)
        error = assert_envelope(response, 429, "rate_limited")
        assert int(response["Retry-After"]) == error["details"]["retry_after"] >= 1


# --- Regressions found by the fuzzer -------------------------------------------------------------


@pytest.mark.parametrize("offset", ["-1", "99999999999999999999"])
def test_history_offsets_out_of_range_are_422_not_500(engineer, offset):
    """Was a 500: a negative offset (Django refuses negative slicing) and one past the database's
    integer range."""
    assert_envelope(engineer.get(f"/v1/evals?offset={offset}"), 422, "validation_error")
    assert engineer.get("/v1/evals?offset=1000000").status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"model": BASE},
        {"model": BASE, "messages": []},
        {"model": BASE, "prompt": "   "},
        {"model": BASE, "messages": None, "prompt": None},
    ],
)
def test_chat_without_messages_or_a_prompt_is_refused_by_validation(engineer, body):
    assert_envelope(engineer.post("/v1/chat", json=body), 422, "validation_error")
    assert not ChatResponse.objects.exists()


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"thumb": 0},
        {"rating": 6},
        {"tags": ["  "]},
        {"tags": ["x" * 41]},
        {"corrected_answer": " "},
    ],
)
def test_feedback_the_schema_refuses_is_refused(engineer, extra):
    response = engineer.post("/v1/feedback", json={"response_id": 1, **extra})
    assert_envelope(response, 422, "validation_error")


@pytest.mark.parametrize("inputs", [[], ["x"] * 257, "", ["a", ""]])
def test_embeddings_need_1_to_256_non_empty_inputs(engineer, inputs):
    assert_envelope(engineer.post("/v1/embeddings", json={"model": EMBED, "input": inputs}), 422)


def test_export_format_outside_the_enum_is_422(engineer):
    response = engineer.get(f"/v1/batch-evals/{uuid.uuid4()}/export?format=xml")
    assert_envelope(response, 422, "validation_error")


@pytest.mark.parametrize(
    "body",
    [
        {"name": "   ", "corpora": [str(uuid.uuid4())]},
        {"name": "kb", "corpora": []},
        {"name": "kb", "corpora": [str(uuid.uuid4())], "filter": {"": 1}},
        {"name": "kb", "corpora": [str(uuid.uuid4())], "filter": {"topic": None}},
    ],
)
def test_index_input_the_schema_refuses_is_refused_by_validation(engineer, body):
    error = assert_envelope(engineer.post("/v1/rag/indexes", json=body), 422, "validation_error")
    assert "loc" in error["details"]["fields"][0]  # refused by validation, before the service


def test_a_value_the_database_refuses_is_a_422_on_both_apis(api_as, monkeypatch, caplog):
    """PostgreSQL refuses NUL characters in text and time zone offsets beyond +-15:59 with a
    DataError (a 500 with a traceback before); SQLite accepts both, so the error is raised here."""
    from django.db import DataError

    from evaluation.models import EvalDataset
    from jobs import serving

    def refuse(*args, **kwargs):
        raise DataError("time zone displacement out of range")

    monkeypatch.setattr(serving, "models_listing", refuse)
    monkeypatch.setattr(EvalDataset.objects, "all", refuse)
    client = api_as(Role.ENGINEER)
    for path in ("/v1/models", "/v1/datasets"):
        error = assert_envelope(client.get(path), 422, "validation_error")
        assert "database" in error["message"]
    assert not [r for r in caplog.records if r.exc_info]  # no traceback in the log
