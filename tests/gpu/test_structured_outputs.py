"""Structured outputs on the offline model: ``response_format`` (OpenAI's json_schema /
json_object) constrains SmolLM2-135M-Instruct's decoding to JSON valid for the schema
(lm-format-enforcer); a schema the library cannot enforce falls back to plain generation."""

from __future__ import annotations

import json
import logging

import pytest
from jsonschema import Draft202012Validator

from gpu import generate

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["sentiment", "score"],
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 10},
    },
}
MESSAGES = [
    {"role": "user", "content": "Rate the sentiment of: 'I loved this film, it was wonderful.'"}
]


@pytest.fixture(scope="module")
def loaded(offline_model_dir):
    return generate.load_lm(offline_model_dir, device="cpu")


def _format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": False}}


def test_json_schema_of_reads_openai_response_formats():
    assert generate.json_schema_of(_format(SCHEMA)) == SCHEMA
    assert generate.json_schema_of({"type": "json_object"}) == {"type": "object"}
    assert generate.json_schema_of({"type": "text"}) is None
    assert generate.json_schema_of(None) is None


def test_bounded_integers_are_enforced_as_enums_and_the_rest_is_kept():
    schema = {
        "type": "object",
        "properties": {
            "rank": {"type": "integer", "minimum": 1, "maximum": 5},
            "share": {"type": "number", "minimum": 0, "maximum": 1.5},  # not integer bounds
            "big": {"type": "integer", "minimum": 0, "maximum": 10_000},  # too many values
        },
    }
    tight = generate._enforceable(schema)
    assert tight["properties"]["rank"] == {"enum": [1, 2, 3, 4, 5]}
    assert tight["properties"]["share"] == schema["properties"]["share"]
    assert tight["properties"]["big"] == schema["properties"]["big"]
    assert schema["properties"]["rank"]["type"] == "integer"  # the caller's schema untouched


def test_response_format_json_schema_gives_valid_json(loaded):
    out = generate.generate(
        loaded, MESSAGES, generate.Decoding(max_new_tokens=48), response_format=_format(SCHEMA)
    )
    answer = json.loads(out.text)
    assert list(Draft202012Validator(SCHEMA).iter_errors(answer)) == []
    assert out.finish_reason == "stop" and out.completion_tokens < 48


def test_unsupported_schema_falls_back_to_plain_generation(loaded, caplog):
    # Mixed-type enums are not enforceable: the library finds out when the answer reaches "x".
    schema = {"type": "object", "required": ["x"], "properties": {"x": {"enum": ["a", 1]}}}
    plain = generate.generate(loaded, MESSAGES, generate.Decoding(max_new_tokens=12))
    with caplog.at_level(logging.WARNING, logger="gpu.generate"):
        out = generate.generate(
            loaded, MESSAGES, generate.Decoding(max_new_tokens=12), response_format=_format(schema)
        )
    assert "unsupported" in caplog.text
    assert out.text == plain.text  # greedy: the unconstrained answer
