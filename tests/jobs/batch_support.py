"""Shared fixtures of the batch job tests: the narratives sample corpus and a loopback model
scripted to answer each framework's JSON (deterministic per text and seed, with run-to-run
noise so that the statistics have something to measure)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest

from tests.jobs.openai_server import OpenAIServer

REPO = Path(__file__).resolve().parents[2]
NARRATIVES = REPO / "samples" / "corpus" / "narratives.jsonl"


def _h(*parts) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def scripted_answer(body: dict) -> str:
    """A valid answer for the framework named in the prompt."""
    messages = body.get("messages") or []
    system = messages[0]["content"] if messages else ""
    user = next((m["content"] for m in messages if m["role"] == "user"), "")
    text = user.rsplit('"""', 2)[-2] if user.count('"""') >= 2 else user
    seed = body.get("seed", 0)
    base = _h(text)
    noise = (_h(text, seed) % 3) - 1  # -1, 0 or +1 from run to run

    def clip(v, lo, hi):
        return max(lo, min(hi, v))

    if "Moral Foundations" in system:
        keys = ["care", "fairness", "loyalty", "authority", "sanctity"]
        scores = {k: clip((base >> (3 * i)) % 11 + 0.5 * noise, 0, 10) for i, k in enumerate(keys)}
        return json.dumps({**scores, "dominant": max(keys, key=lambda k: scores[k])})
    kinds = ["heroic", "tragic", "redemptive", "cautionary", "none"]
    return json.dumps(
        {
            "protagonist_clarity": clip(base % 5 + 1 + noise, 1, 5),
            "conflict_intensity": clip((base >> 4) % 5 + 1, 1, 5),
            "resolution_promise": clip((base >> 8) % 5 + 1 + (noise if seed % 2 else 0), 1, 5),
            "emotional_intensity": clip((base >> 12) % 101 + 4 * noise, 0, 100),
            "story_type": kinds[(base >> 16) % 5 if noise >= 0 else (base >> 20) % 5],
        }
    )


def json_completion(body: dict) -> dict:
    out = OpenAIServer.completion(body)
    answer = scripted_answer(body)
    out["choices"][0]["message"]["content"] = answer
    out["usage"]["completion_tokens"] = len(answer.split())
    out["usage"]["total_tokens"] = out["usage"]["prompt_tokens"] + len(answer.split())
    return out


@pytest.fixture
def narratives(db):
    from corpora import services as corpus_services

    return corpus_services.corpus_create(
        name="Narratives", upload=io.BytesIO(NARRATIVES.read_bytes()), user=None
    )


@pytest.fixture
def json_model(openai_server, loopback_model, fast_gateway):
    """The loopback chat model answering valid framework JSON; returns the RegisteredModel."""
    openai_server.completion = json_completion
    return loopback_model
