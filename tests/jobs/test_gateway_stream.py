"""True streaming through the gateway (``gateway.chat_stream``): the real openai SDK streams
from the loopback server, chunks reach the caller while the answer is still being written,
the usage chunk, one ledger row, the reservation settled however the stream ends (complete,
reader gone, provider broke off), cache hits replayed as chunks and shared with ``chat``; the
offline model streams; /v1 end to end with the SDK; Django's own /v1 errors in the envelope."""

import gc
import os
import time
from decimal import Decimal
from pathlib import Path

import pytest

from billing.models import LlmCall, LlmReservation
from config.roles import Role
from jobs import gateway
from tests.conftest import assert_envelope

pytest_plugins = ["tests.jobs.openai_server"]
pytestmark = pytest.mark.django_db

REPO = Path(__file__).resolve().parents[2]
PROMPT = "one two three four five six seven"  # the loopback echoes it: 8 words
REQUEST = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 32}


def _text(chunks: list[dict]) -> str:
    return "".join(
        (c["choices"][0].get("delta") or {}).get("content") or ""
        for c in chunks
        if c.get("choices")
    )


def test_chunks_arrive_before_the_answer_is_done_and_the_call_settles(
    openai_server, loopback_model, fast_gateway
):
    openai_server.stream_delay = 0.15  # 11 events: about 1.5 s for the whole answer
    started = time.monotonic()
    arrivals: list[tuple[float, dict]] = []
    stream = gateway.chat_stream(
        model=loopback_model.key,
        request=REQUEST,
        caller=gateway.Caller(feature="test"),
    )
    for chunk in stream:
        arrivals.append((time.monotonic() - started, chunk))
    chunks = [c for _, c in arrivals]
    first_content = next(t for t, c in arrivals if c.get("choices") and _text([c]))
    total = arrivals[-1][0]
    assert total > 1.2
    assert first_content < total - 0.8, (first_content, total)  # it really streamed
    assert _text(chunks) == f"echo: {PROMPT}"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    # the provider was asked for a stream with usage, through the openai SDK
    sent = openai_server.calls()[0].body
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert "OpenAI/Python" in openai_server.calls()[0].headers["user-agent"]
    finish = [c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert finish[0]["choices"][0]["finish_reason"] == "stop"
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 8,
        "completion_tokens": 8,
        "total_tokens": 16,
    }
    call = LlmCall.objects.get()
    expected = Decimal(8 * 1 + 8 * 2) / Decimal(1_000_000)
    assert (call.prompt_tokens, call.completion_tokens, call.cached) == (8, 8, False)
    assert call.outcome == "ok" and call.cost == expected and call.feature == "test"
    assert stream.meta.cost == expected and stream.meta.ledger_id == call.pk
    assert LlmReservation.objects.count() == 0

    # The same request again: a cache hit replayed as chunks at cost 0, no provider call.
    again = list(gateway.chat_stream(model=loopback_model.key, request=REQUEST))
    assert _text(again) == f"echo: {PROMPT}" and len(again) > 3
    assert again[-1]["usage"]["completion_tokens"] == 8
    hit = LlmCall.objects.latest("id")
    assert hit.cached and hit.cost == 0 and hit.completion_tokens == 8
    # ... and the non-streaming call shares the hit (same key)
    whole = gateway.chat(model=loopback_model.key, request=REQUEST)
    assert whole.meta.cached and whole.text == f"echo: {PROMPT}"
    assert len(openai_server.calls()) == 1
    assert LlmReservation.objects.count() == 0


def test_usage_left_out_unless_asked(openai_server, loopback_model, fast_gateway):
    chunks = list(
        gateway.chat_stream(model=loopback_model.key, request=REQUEST, include_usage=False)
    )
    assert _text(chunks) == f"echo: {PROMPT}"
    assert not any("usage" in c for c in chunks)
    assert LlmCall.objects.get().completion_tokens == 8


@pytest.mark.parametrize("how", ["close", "drop"])
def test_reader_that_stops_midway_leaves_no_open_reservation(
    openai_server, loopback_model, fast_gateway, how
):
    openai_server.stream_delay = 0.1
    stream = gateway.chat_stream(model=loopback_model.key, request=REQUEST)
    taken = [next(stream), next(stream), next(stream)]
    assert _text(taken)  # content had started
    assert LlmReservation.objects.count() == 1  # held while the stream runs
    if how == "close":
        stream.close()
    else:
        del stream
        gc.collect()
    assert LlmReservation.objects.count() == 0
    call = LlmCall.objects.get()
    assert call.outcome == "error:client_closed" and not call.cached
    assert call.completion_tokens > 0 and call.cost > 0  # what was produced is charged
    # nothing half-done was cached: the next call reaches the provider
    list(gateway.chat_stream(model=loopback_model.key, request=REQUEST))
    assert len(openai_server.calls()) == 2


def test_provider_breaking_off_mid_stream_ends_with_an_error_event(
    openai_server, loopback_model, fast_gateway
):
    openai_server.stream_break_after = 3
    chunks = list(gateway.chat_stream(model=loopback_model.key, request=REQUEST))
    assert chunks[-1]["error"]["code"] == "stream_interrupted"
    assert chunks[-1]["error"]["request_id"]
    assert _text(chunks[:-1]).startswith("echo:")
    assert len(openai_server.calls()) == 1  # no retry after the first chunk
    call = LlmCall.objects.get()
    assert call.outcome == "error:stream_interrupted"
    assert LlmReservation.objects.count() == 0
    openai_server.stream_break_after = None
    list(gateway.chat_stream(model=loopback_model.key, request=REQUEST))
    assert len(openai_server.calls()) == 2  # the broken answer was not cached


def test_errors_before_the_first_chunk_are_retried_or_raised(
    openai_server, loopback_model, fast_gateway
):
    openai_server.fail(503)
    stream = gateway.chat_stream(model=loopback_model.key, request=REQUEST)
    assert _text(list(stream)) == f"echo: {PROMPT}"
    assert stream.meta.attempts == 2 and len(fast_gateway) == 1
    openai_server.fail(400)
    with pytest.raises(gateway.ProviderError) as caught:
        gateway.chat_stream(model=loopback_model.key, request={**REQUEST, "seed": 3})
    assert caught.value.code == "provider_bad_request"
    assert LlmCall.objects.latest("id").outcome == "error:provider_bad_request"
    with pytest.raises(gateway.InvalidRequest):
        gateway.chat_stream(model=loopback_model.key, request={**REQUEST, "stream": True})
    assert LlmReservation.objects.count() == 0


@pytest.fixture
def offline_rows(settings):
    import importlib

    from django.apps import apps

    importlib.import_module("jobs.migrations.0002_offline_provider").register(apps, None)
    settings.TRAINING_MODEL_CACHE = os.environ.get(
        "CRUCIBLE_MODEL_CACHE", str(REPO / "var" / "models")
    )
    settings.GATEWAY_OFFLINE_DEVICE = "cpu"


def test_offline_model_streams_the_same_answer(offline_rows):
    request = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8}
    model = "offline/smollm2-135m-instruct"
    chunks = list(gateway.chat_stream(model=model, request=request, cache="no-store"))
    pieces = [c for c in chunks if c.get("choices") and _text([c])]
    assert len(pieces) >= 2  # token by token, not one piece
    whole = gateway.chat(model=model, request=request, cache="no-store")
    assert _text(chunks) == whole.text
    assert chunks[-1]["usage"]["completion_tokens"] == whole.meta.completion_tokens
    assert chunks[-1]["usage"]["prompt_tokens"] == whole.meta.prompt_tokens
    calls = list(LlmCall.objects.order_by("id"))
    assert [c.outcome for c in calls] == ["ok", "ok"] and calls[0].provider == "offline"
    assert LlmReservation.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_openai_sdk_streams_through_v1_from_the_loopback_provider(
    live_server, openai_server, loopback_model, fast_gateway
):
    """End to end: the SDK against /v1/chat/completions, the gateway's SDK against the
    loopback server; the first chunk reaches the client well before the answer is done."""
    import openai

    from jobs.models import ChatResponse
    from tests.factories import TokenFactory, UserFactory

    openai_server.stream_delay = 0.15
    token = TokenFactory(user=UserFactory(role=Role.ENGINEER))
    sdk = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=token.key, max_retries=0)
    started = time.monotonic()
    arrivals = []
    for chunk in sdk.chat.completions.create(
        model=loopback_model.key,
        messages=REQUEST["messages"],
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    ):
        arrivals.append((time.monotonic() - started, chunk))
    text = "".join(c.choices[0].delta.content or "" for _, c in arrivals if c.choices)
    first = next(t for t, c in arrivals if c.choices and c.choices[0].delta.content)
    assert text == f"echo: {PROMPT} (seed 0)"  # /v1 always sends a seed (0 by default)
    assert first < arrivals[-1][0] - 0.8
    assert arrivals[-1][1].usage.completion_tokens == 10
    response = ChatResponse.objects.get()
    assert response.answer == text and response.completion_tokens == 10
    assert LlmCall.objects.get().cost > 0 and LlmReservation.objects.count() == 0


def test_v1_errors_django_answers_itself_use_the_envelope(api_as):
    client = api_as(Role.ENGINEER)
    response = client.get("/v1/chat/completions")
    error = assert_envelope(response, 405)
    assert "POST" in response["Allow"]
    assert error["code"] == "method_not_allowed"


def test_chat_page_stream_session_auth_records_the_response(
    client, openai_server, loopback_model, fast_gateway
):
    """The chat page's request (static/js/chat.js): session auth, streamed SSE, the finish
    chunk carrying the recorded response's metadata, the usage chunk, then [DONE]."""
    import json

    from jobs.models import ChatResponse
    from tests.factories import UserFactory

    client.force_login(UserFactory(role=Role.ENGINEER))
    r = client.post(
        "/v1/chat/completions",
        {
            "model": loopback_model.key,
            "messages": [{"role": "user", "content": "hello there"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        content_type="application/json",
    )
    assert r.status_code == 200 and r["Content-Type"] == "text/event-stream"
    events = b"".join(r.streaming_content).decode().strip().split("\n\n")
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert _text(chunks) == "echo: hello there (seed 0)"
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    response = ChatResponse.objects.get()
    assert chunks[-2]["crucible"]["response_id"] == response.pk
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert response.cost == LlmCall.objects.get().cost.quantize(Decimal("0.000001"))
    assert LlmReservation.objects.count() == 0


def test_chat_stream_viewer_403_and_anonymous_401(api_as, anon_api, loopback_model):
    body = {"model": loopback_model.key, "messages": [{"role": "user", "content": "x"}]}
    assert_envelope(
        api_as(Role.VIEWER).post("/v1/chat/completions", json={**body, "stream": True}), 403
    )
    assert_envelope(anon_api.post("/v1/chat/completions", json={**body, "stream": True}), 401)
    assert not LlmCall.objects.exists()
