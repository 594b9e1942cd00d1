"""The public /v1 API (jobs/public_api.py): auth and roles, the seed's POST /v1/chat, OpenAI
shapes (streaming included), profiles and output validation, budget refusal, rate limits,
the model server down (503 and /readyz), adapters registered when their job completes.

Most tests stand in for the offline model's generation (OfflineProvider.chat) so they run in
milliseconds; the SDK tests at the end go through a live server with the real ``openai`` SDK,
the real offline SmolLM2 and the model server (gpu/serve.py) as the crucible-server provider.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from decimal import Decimal

import pytest
from django.test import override_settings

from config.roles import Role
from jobs import serving
from jobs.gateway.providers import BaseProvider, OfflineProvider, ProviderResponse
from jobs.models import ChatResponse, GatewaySettings, Provider, RegisteredModel, ResponseProfile
from tests.conftest import assert_envelope

BASE = "offline/smollm2-135m-instruct"
EMBED = "offline/all-minilm-l6-v2"


@pytest.fixture(autouse=True)
def _model_cache(settings):
    from pathlib import Path

    settings.TRAINING_MODEL_CACHE = str(Path(__file__).resolve().parents[2] / "var" / "models")


@pytest.fixture
def fake_model(monkeypatch):
    """The offline chat stood in for: answers ``fake_model.text`` (a list pops per call)."""

    class Fake:
        answers: list[str] = []
        calls: list[dict] = []

    def chat(self, model, request, *, timeout, request_id):
        Fake.calls.append(request)
        text = Fake.answers.pop(0) if Fake.answers else f"Answer {len(Fake.calls)}."
        completion = len(text.split()) + 1
        finish = "length" if completion >= int(request.get("max_tokens") or 999) else "stop"
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model.remote_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": completion, "total_tokens": 0},
        }
        body["usage"]["total_tokens"] = 12 + completion
        return ProviderResponse(body, 12, completion)

    monkeypatch.setattr(OfflineProvider, "chat", chat)
    # Streams replay the fake's whole answer as chunks (the base provider's fallback).
    monkeypatch.setattr(OfflineProvider, "chat_stream", BaseProvider.chat_stream)
    monkeypatch.setattr(OfflineProvider, "prompt_tokens", lambda self, model, request: 12)
    Fake.answers, Fake.calls = [], []
    return Fake


def chat(client, **body):
    body.setdefault("model", BASE)
    body.setdefault("prompt", "What is a budget?")
    return client.post("/v1/chat", json=body)


# --- Authorization -------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    "method,path",
    [
        ("get", "/v1/models"),
        ("get", "/v1/profiles"),
        ("post", "/v1/chat"),
        ("post", "/v1/chat/completions"),
        ("post", "/v1/embeddings"),
        ("post", "/v1/feedback"),
    ],
)
def test_anonymous_gets_401_everywhere(anon_api, method, path):
    response = getattr(anon_api, method)(path, json={} if method == "post" else None)
    assert_envelope(response, 401, "not_authenticated")


@pytest.mark.django_db
def test_viewer_lists_models_but_may_not_chat(api_as, fake_model):
    viewer = api_as(Role.VIEWER)
    assert viewer.get("/v1/models").status_code == 200
    error = assert_envelope(chat(viewer), 403, "permission_denied")
    assert "viewer" not in error["message"] or "not chat" in error["message"]
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}]}
    assert_envelope(viewer.post("/v1/chat/completions", json=body), 403)
    assert_envelope(viewer.post("/v1/embeddings", json={"model": EMBED, "input": "x"}), 403)
    assert_envelope(viewer.post("/v1/feedback", json={"response_id": 1, "rating": 5}), 403)
    assert not ChatResponse.objects.exists() and fake_model.calls == []


@pytest.mark.django_db
@pytest.mark.parametrize("role", [Role.ANALYST, Role.ENGINEER, Role.ADMIN])
def test_working_roles_may_chat(api_as, fake_model, role):
    assert chat(api_as(role)).status_code == 200


# --- POST /v1/chat ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_chat_contract_profile_recorded_and_cache_hit(api_as, fake_model):
    client = api_as(Role.ENGINEER)
    first = chat(client, profile="concise")
    assert first.status_code == 200, first.content
    body = first.json()
    assert body["answer"] == "Answer 1."
    assert body["model"] == BASE and body["profile"] == "concise@v1"
    assert (body["prompt_tokens"], body["completion_tokens"], body["total_tokens"]) == (12, 3, 15)
    assert body["cache_hit"] is False and body["flags"] == [] and body["cost"] == "0.000000"
    assert body["latency_ms"] >= 0 and body["request_id"] == first["X-Request-ID"]
    stored = ChatResponse.objects.get(pk=body["response_id"])
    assert stored.profile.label == "concise@v1" and stored.answer == "Answer 1."
    # the profile's persona and length preference went to the model as the system prompt
    sent = fake_model.calls[0]
    assert sent["messages"][0]["role"] == "system"
    assert "one or two short sentences" in sent["messages"][0]["content"]
    assert "about 25 words" in sent["messages"][0]["content"]
    assert sent["max_tokens"] == 60
    second = chat(client, profile="concise").json()
    assert second["cache_hit"] is True and second["answer"] == "Answer 1."
    assert len(fake_model.calls) == 1


@pytest.mark.django_db
def test_chat_messages_and_controls(api_as, fake_model):
    client = api_as(Role.ANALYST)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
    ]
    body = {"max_tokens": 20, "temperature": 0.5, "seed": 9}
    r = client.post("/v1/chat", json={"model": BASE, "messages": messages, "controls": body})
    assert r.status_code == 200, r.content
    sent = fake_model.calls[0]
    assert sent["messages"][0]["content"].endswith("Be brief.")  # after the profile's persona
    assert (sent["max_tokens"], sent["temperature"], sent["seed"]) == (20, 0.5, 9)


@pytest.mark.django_db
def test_bad_chat_input_is_refused_and_writes_nothing(api_as, fake_model):
    client = api_as(Role.ENGINEER)
    assert_envelope(chat(client, prompt="  "), 422, "validation_error")
    assert_envelope(chat(client, profile="nope"), 404, "not_found")
    error = assert_envelope(chat(client, controls={"max_tokens": 5000}), 422)
    assert "160" in error["message"]  # the balanced profile's limit
    assert_envelope(chat(client, model="offline/none"), 404, "unknown_model")
    assert_envelope(chat(client, controls={"temperature": 7}), 422)
    assert not ChatResponse.objects.exists() and fake_model.calls == []


@pytest.mark.django_db
def test_output_validation_flags_and_one_regeneration(api_as, fake_model):
    client = api_as(Role.ENGINEER)
    loop = "I am sorry. " * 12
    fake_model.answers = [loop, "A clean answer this time."]
    body = chat(client, profile="balanced").json()  # balanced regenerates on flags
    assert body["regenerated"] is True and body["answer"] == "A clean answer this time."
    assert body["flags"] == []
    assert len(fake_model.calls) == 2
    assert fake_model.calls[1]["seed"] == fake_model.calls[0]["seed"] + 1
    # concise does not regenerate: the flag comes back with the answer
    fake_model.answers = [loop]
    body = chat(client, profile="concise", prompt="another").json()
    assert body["regenerated"] is False
    assert "repetition" in {f["code"] for f in body["flags"]}
    fake_model.answers = [""]
    body = chat(client, profile="concise", prompt="third").json()
    assert "empty" in {f["code"] for f in body["flags"]}


@pytest.mark.django_db
def test_json_profile_flags_invalid_json(api_as, fake_model):
    client = api_as(Role.ENGINEER)
    fake_model.answers = ["not json", "still not json"]
    body = chat(client, profile="json-facts").json()
    assert body["regenerated"] is True
    assert [f["code"] for f in body["flags"]] == ["invalid_json"]
    fake_model.answers = ['{"answer": "blue"}']
    body = chat(client, profile="json-facts", prompt="sky?").json()
    assert body["flags"] == [] and body["regenerated"] is False


def test_answer_flags_truncated_and_over_length():
    flags = serving.answer_flags(
        text=" ".join(["word"] * 10),
        finish_reason="length",
        completion_tokens=10,
        max_tokens=10,
        target_words=4,
        json_expected=False,
    )
    assert {f["code"] for f in flags} == {"truncated", "over_length"}


@pytest.mark.django_db
def test_profiles_are_files_mirrored_and_versioned(api_as, tmp_path):
    data = api_as(Role.VIEWER).get("/v1/profiles").json()["data"]
    ids = {p["id"] for p in data}
    assert {"balanced@v1", "concise@v1", "formal-advisor@v1", "json-facts@v1"} <= ids
    assert all(p["source_path"].startswith("jobs/profiles/") for p in data)
    bad = tmp_path / "broken.v1.yaml"
    bad.write_text(
        "name: broken\nversion: 1\ntitle: B\nlength: {target_words: 90, max_tokens: 10}\n"
    )
    with pytest.raises(serving.InvalidInput) as caught:
        serving.profiles_sync(directory=tmp_path, force=True)
    assert "style" in caught.value.message and "target_words" in caught.value.message
    assert not ResponseProfile.objects.filter(name="broken").exists()


# --- OpenAI shapes through the Django test client ------------------------------------------------


@pytest.mark.django_db
def test_completions_stream_shape(api_as, fake_model):
    client = api_as(Role.ENGINEER)
    fake_model.answers = ["The sky is blue."]
    body = {
        "model": BASE,
        "messages": [{"role": "user", "content": "Sky?"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r["Content-Type"] == "text/event-stream"
    events = b"".join(r.streaming_content).decode().strip().split("\n\n")
    assert events[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(e[6:]) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "The sky is blue."
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-2]["crucible"]["response_id"] == ChatResponse.objects.get().pk


# --- Budget, rate limits, runtime down ---------------------------------------------------------


@pytest.mark.django_db
def test_budget_refusal(api_as, fake_model):
    from billing.services import budget_set

    model = RegisteredModel.objects.get(key=BASE)
    # $0.01 a token: 12 prompt + 160 (the profile's max) tokens reserve $1.72 > $1.00
    model.price_input_per_m = model.price_output_per_m = Decimal(10_000)
    model.save()
    budget_set(user=None, amount=Decimal("1.00"))
    error = assert_envelope(chat(api_as(Role.ENGINEER)), 409, "budget_exceeded")
    assert "budget" in error["message"]
    assert fake_model.calls == [] and not ChatResponse.objects.exists()


@pytest.mark.django_db
@override_settings(API_RATE_LIMIT="2/m")
def test_rate_limit_429_with_retry_after(api_as, fake_model):
    client = api_as(Role.ENGINEER)
    assert chat(client).status_code == 200
    assert chat(client, prompt="two").status_code == 200
    response = chat(client, prompt="three")
    error = assert_envelope(response, 429, "rate_limited")
    assert 1 <= int(response["Retry-After"]) <= 60
    assert error["details"]["retry_after"] == int(response["Retry-After"])


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.django_db
def test_model_server_down_is_a_clear_503_and_readyz_says_so(api_as, client, settings):
    settings_row = GatewaySettings.load()
    settings_row.retry_attempts = 1
    settings_row.save()
    url = settings.MODEL_SERVER_URL = f"http://127.0.0.1:{_dead_port()}/v1"
    provider = serving.model_server_provider_sync(refresh=False)
    RegisteredModel.objects.create(
        provider=provider,
        remote_id="smollm2-135m-instruct",
        capabilities=["chat"],
        price_input_per_m=0,
        price_output_per_m=0,
        price_source="local",
    )
    response = chat(api_as(Role.ENGINEER), model="crucible-server/smollm2-135m-instruct")
    error = assert_envelope(response, 503, "model_unavailable")
    assert url in error["message"] and "not reachable" in error["message"]
    assert int(response["Retry-After"]) >= 1
    admin_token = api_as(Role.ADMIN).token  # details are for admins
    ready = client.get("/readyz", headers={"Authorization": f"Token {admin_token.key}"}).json()
    server = ready["components"]["model_runtime"]["server"]
    assert server["state"] == "down" and server["url"] == url


# --- Adapters on job completion ------------------------------------------------------------------


@pytest.mark.django_db
def test_adapter_appears_in_models_when_its_job_completes(
    api_as, django_capture_on_commit_callbacks, local_storage
):
    import io

    from config.storage import storage_save
    from corpora.services import training_file_create
    from tests.training.conftest import conversations
    from tests.training.test_pages import make_job
    from training import services as training_services
    from training.models import Artifact, BaseModel, JobStatus, Preset

    tf = training_file_create(name="advisor", upload=io.BytesIO(conversations()), user=None)
    job = make_job(
        tf,
        BaseModel.objects.get(name="SmolLM2-135M-Instruct"),
        Preset.objects.get(key="smoke"),
        name="Advisor adapter",
        status=JobStatus.FINALIZATION,
    )
    prefix = f"training/jobs/{job.pk}/adapter"
    storage_save(f"{prefix}/adapter_config.json", io.BytesIO(b'{"r": 4}'))
    Artifact.objects.create(job=job, kind=Artifact.Kind.ADAPTER, storage_path=prefix)
    client = api_as(Role.VIEWER)
    key = f"offline/crucible-{job.pk}"
    assert key not in {m["id"] for m in client.get("/v1/models").json()["data"]}
    with django_capture_on_commit_callbacks(execute=True):
        training_services._transition(job, JobStatus.COMPLETED, reason="worker completed")
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed[key]["parent"] == BASE
    assert listed[key]["revision"].startswith("sha256:")
    assert client.get(f"/v1/models/{key}").json()["parent"] == BASE


# --- The real SDK against a live server ------------------------------------------------------------


@pytest.fixture
def model_server(settings):
    """gpu/serve.py on a loopback port (the real offline model), stopped after the test."""
    import uvicorn

    from gpu.model import ensure_offline_model
    from gpu.serve import Engine, create_app

    base_dir = ensure_offline_model("SmolLM2-135M-Instruct", settings.TRAINING_MODEL_CACHE)
    engine = Engine(base_dir, base_id="smollm2-135m-instruct", device="cpu", batch_window_ms=5)
    port = _dead_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_openai_sdk_lists_chats_streams_and_embeds(live_server, model_server, settings, tmp_path):
    """The acceptance path: the ``openai`` SDK with a Crucible token against /v1: models,
    chat with the in-process base model and with the model server (crucible-server provider),
    streaming with usage, embeddings of 384 dimensions; /readyz sees the server up."""
    import openai

    from gpu.model import ensure_offline_model
    from tests.factories import TokenFactory, UserFactory

    settings.GATEWAY_OFFLINE_DEVICE = "cpu"
    token = TokenFactory(user=UserFactory(role=Role.ENGINEER))
    settings.MODEL_SERVER_URL = model_server
    serving.model_server_provider_sync()
    sdk = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=token.key, max_retries=0)
    ids = [m.id for m in sdk.models.list().data]
    assert {BASE, EMBED, "crucible-server/smollm2-135m-instruct"} <= set(ids)
    # a LoRA adapter loaded onto the model server appears (parent = base) once the registry
    # is refreshed
    import httpx

    from tests.gpu.test_serve import make_adapter

    adapter = make_adapter(
        ensure_offline_model("SmolLM2-135M-Instruct", settings.TRAINING_MODEL_CACHE),
        tmp_path / "tuned",
        101,
    )
    loaded = httpx.post(
        model_server.removesuffix("/v1") + "/v1/load_lora_adapter",
        json={"lora_name": "tuned", "lora_path": str(adapter)},
    )
    assert loaded.status_code == 200
    serving.model_server_provider_sync()
    listed = {m.id: m for m in sdk.models.list().data}
    assert listed["crucible-server/tuned"].model_extra["parent"] == (
        "crucible-server/smollm2-135m-instruct"
    )
    question = [{"role": "user", "content": "Name a colour."}]
    answers = {}
    for model in (BASE, "crucible-server/smollm2-135m-instruct", "crucible-server/tuned"):
        reply = sdk.chat.completions.create(model=model, messages=question, max_tokens=12, seed=3)
        answers[model] = reply.choices[0].message.content
        assert answers[model]
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        assert 1 <= reply.usage.completion_tokens <= 12
        stream = sdk.chat.completions.create(
            model=model,
            messages=question,
            max_tokens=12,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == answers[model]
        assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
        assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens
    # the adapter answers differently from its base for the same seed
    assert answers["crucible-server/tuned"] != answers["crucible-server/smollm2-135m-instruct"]
    # the in-process runtime and the model server run the same base model
    assert answers[BASE] == answers["crucible-server/smollm2-135m-instruct"]
    vectors = sdk.embeddings.create(model=EMBED, input=["hello world"])
    assert len(vectors.data[0].embedding) == 384
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="wrong").models.list()

    admin_token = TokenFactory(user=UserFactory(role=Role.ADMIN))  # details are for admins
    ready = httpx.get(
        f"{live_server.url}/readyz", headers={"Authorization": f"Token {admin_token.key}"}
    ).json()
    assert ready["components"]["model_runtime"]["server"]["state"] == "up"
    assert Provider.objects.get(slug="crucible-server").base_url == model_server


@pytest.mark.django_db
def test_model_server_command_says_when_the_server_does_not_answer():
    from django.core.management import CommandError, call_command

    url = f"http://127.0.0.1:{_dead_port()}/v1"
    with pytest.raises(CommandError, match="does not answer"):
        call_command("model_server", "--url", url)
    assert not Provider.objects.filter(slug="crucible-server").exists()
