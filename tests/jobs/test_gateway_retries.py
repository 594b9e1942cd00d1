"""The gateway through the real openai SDK against the loopback server: OpenAI-shaped results,
the ledger, retries (attempts, waits, the latest Retry-After), typed permanent errors, the
deadline, the circuit breaker, and keys kept out of logs and errors."""

import logging
import time
from decimal import Decimal

import pytest

from billing.models import LlmCall, LlmReservation
from jobs import gateway
from jobs.gateway import client
from tests.factories import UserFactory

# The loopback server's fixtures: openai_server, loopback_model, fast_gateway.
pytest_plugins = ["tests.jobs.openai_server"]
pytestmark = pytest.mark.django_db

BODY = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16, "seed": 3}


def test_chat_returns_openai_shape_and_one_ledger_row(loopback_model, openai_server, fast_gateway):
    user = UserFactory()
    result = gateway.chat(
        model=loopback_model.key,
        request=BODY,
        caller=gateway.Caller(user=user, feature="judge", subject=user, attribution="acme"),
    )
    assert result.text == "echo: hello there (seed 3)"
    assert result.response["object"] == "chat.completion"
    assert result.response["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "total_tokens": 8,
    }
    meta = result.meta
    assert (meta.provider, meta.model, meta.attempts, meta.cached) == (
        loopback_model.provider.slug,
        loopback_model.key,
        1,
        False,
    )
    # $1 per 1M input, $2 per 1M output.
    assert meta.cost == Decimal("0.00001300")
    sent = openai_server.calls()
    assert len(sent) == 1
    assert sent[0].body == {**BODY, "model": "test-chat"}
    assert sent[0].headers["x-request-id"] == meta.request_id
    call = LlmCall.objects.get()
    assert call.pk == meta.ledger_id
    assert (call.user, call.feature, call.subject, call.attribution) == (
        user,
        "judge",
        user,
        "acme",
    )
    assert (call.prompt_tokens, call.completion_tokens, call.cost) == (3, 5, Decimal("0.000013"))
    assert (call.attempts, call.cached, call.outcome) == (1, False, "ok")
    assert not LlmReservation.objects.exists()


def test_latest_retry_after_is_honoured(loopback_model, openai_server, fast_gateway):
    openai_server.fail(429, headers={"Retry-After": "2"})
    openai_server.fail(503, headers={"retry-after-ms": "700"})
    openai_server.fail(500)
    result = gateway.chat(model=loopback_model.key, request=BODY)
    assert result.meta.attempts == 4
    assert len(openai_server.calls()) == 4
    # backoff is at most 0.05 s here: each wait is the latest response's Retry-After, if any.
    assert fast_gateway[0] == pytest.approx(2.0)
    assert fast_gateway[1] == pytest.approx(0.7)
    assert 0 <= fast_gateway[2] <= 0.05
    assert result.meta.waits == fast_gateway
    assert LlmCall.objects.get().attempts == 4


@pytest.mark.parametrize("fault", ["timeout", "reset", "malformed", 408, 409, 502])
def test_transient_faults_are_retried(loopback_model, openai_server, fast_gateway, fault):
    loopback_model.provider.timeout_s = 0.3
    loopback_model.provider.save()
    openai_server.fail(fault, delay=1.0 if fault == "timeout" else 0.0)
    result = gateway.chat(model=loopback_model.key, request=BODY)
    assert result.text.startswith("echo: hello there")
    assert result.meta.attempts == 2
    assert len(openai_server.calls()) == 2
    assert len(fast_gateway) == 1


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "provider_bad_request"),
        (401, "provider_unauthorized"),
        (404, "provider_model_not_found"),
        (422, "provider_bad_request"),
    ],
)
def test_permanent_errors_fail_at_once_typed(
    loopback_model, openai_server, fast_gateway, status, code
):
    openai_server.fail(status, body={"error": {"message": "nope", "type": "invalid_request"}})
    with pytest.raises(gateway.ProviderError) as caught:
        gateway.chat(model=loopback_model.key, request=BODY)
    error = caught.value
    assert (error.code, error.transient, error.status_code) == (code, False, 502)
    assert error.details["status"] == status
    assert len(openai_server.calls()) == 1
    assert fast_gateway == []
    call = LlmCall.objects.get()
    assert (call.outcome, call.attempts, call.cost) == (f"error:{code}", 1, 0)
    assert not LlmReservation.objects.exists()


def test_transient_errors_exhausted(loopback_model, openai_server, fast_gateway):
    openai_server.fail(500, times=4)
    with pytest.raises(gateway.ProviderError) as caught:
        gateway.chat(model=loopback_model.key, request=BODY)
    assert caught.value.transient is True
    assert caught.value.code == "provider_unavailable"
    assert len(openai_server.calls()) == 4
    assert len(fast_gateway) == 3
    assert LlmCall.objects.get().outcome == "error:provider_unavailable"
    assert not LlmReservation.objects.exists()


def test_retry_after_past_the_deadline_stops(loopback_model, openai_server, fast_gateway):
    openai_server.fail(429, headers={"Retry-After": "30"})
    with pytest.raises(gateway.DeadlineExceeded) as caught:
        gateway.chat(model=loopback_model.key, request=BODY, deadline_s=5)
    assert caught.value.status_code == 504
    assert caught.value.retry_after == pytest.approx(30)
    assert len(openai_server.calls()) == 1
    assert fast_gateway == []


def test_backoff_has_full_jitter_and_cap():
    delays = [client.backoff_delay(5, base=0.5, cap=2.0, retry_after=None) for _ in range(300)]
    assert all(0 <= d <= 2.0 for d in delays)
    assert min(delays) < 0.3 < 1.7 < max(delays)  # spread over the whole [0, cap] range
    assert client.backoff_delay(1, base=0.5, cap=2.0, retry_after=3.5) == 3.5


def test_breaker_opens_fails_fast_then_half_open_probe_closes(
    loopback_model, openai_server, fast_gateway
):
    from jobs.models import GatewaySettings

    conf = GatewaySettings.load()
    conf.retry_attempts, conf.breaker_failure_threshold, conf.breaker_reset_s = 1, 3, 0.5
    conf.save()
    slug = loopback_model.provider.slug
    openai_server.fail(500, times=3)
    for _ in range(3):
        with pytest.raises(gateway.ProviderError):
            gateway.chat(model=loopback_model.key, request=BODY, cache="no-store")
    state = gateway.breaker_states()[slug]
    assert state["state"] == "open" and state["failures"] == 3
    assert 0 < state["retry_after_s"] <= 0.5

    started = time.perf_counter()
    with pytest.raises(gateway.CircuitOpen) as caught:
        gateway.chat(model=loopback_model.key, request=BODY, cache="no-store")
    assert time.perf_counter() - started < 0.5  # fast: no request sent
    assert caught.value.status_code == 503 and 0 < caught.value.retry_after <= 0.5
    assert len(openai_server.calls()) == 3
    assert LlmCall.objects.filter(outcome="error:circuit_open").count() == 1

    time.sleep(0.6)
    assert gateway.breaker_states()[slug]["state"] == "half_open"
    openai_server.fail(500)  # the probe fails: open again
    with pytest.raises(gateway.ProviderError):
        gateway.chat(model=loopback_model.key, request=BODY, cache="no-store")
    assert gateway.breaker_states()[slug]["state"] == "open"
    time.sleep(0.6)
    result = gateway.chat(model=loopback_model.key, request=BODY, cache="no-store")
    assert result.meta.attempts == 1
    assert gateway.breaker_states()[slug] == {
        "state": "closed",
        "retry_after_s": None,
        "failures": 0,
    }


def test_breaker_opening_mid_retries_stops_them(loopback_model, openai_server, fast_gateway):
    from jobs.models import GatewaySettings

    conf = GatewaySettings.load()
    conf.retry_attempts, conf.breaker_failure_threshold = 4, 2
    conf.save()
    openai_server.fail(503, times=4)
    with pytest.raises(gateway.CircuitOpen):
        gateway.chat(model=loopback_model.key, request=BODY)
    assert len(openai_server.calls()) == 2


def test_api_key_never_in_logs_or_errors(
    loopback_model, openai_server, fast_gateway, caplog, monkeypatch
):
    secret = "sk-test-9f8e7d6c5b4a39281706"
    provider = loopback_model.provider
    provider.set_api_key(secret)
    provider.save()
    assert secret not in provider.api_key_encrypted and provider.api_key_last4 == "1706"
    openai_server.api_key = secret
    caplog.set_level(logging.DEBUG)
    result = gateway.chat(model=loopback_model.key, request=BODY, cache="no-store")
    assert openai_server.calls()[-1].headers["authorization"] == f"Bearer {secret}"
    assert result.meta.attempts == 1

    # The server echoes the key back in its error body; the gateway must not repeat it.
    openai_server.fail(401, body={"error": {"message": f"bad key {secret}"}})
    with pytest.raises(gateway.ProviderError) as caught:
        gateway.chat(model=loopback_model.key, request=BODY, cache="no-store")
    openai_server.fail(503, body={"error": {"message": f"busy {secret}"}}, times=4)
    with pytest.raises(gateway.ProviderError) as caught2:
        gateway.chat(model=loopback_model.key, request=BODY, cache="no-store")
    for error in (caught.value, caught2.value):
        assert secret not in str(error) and secret not in repr(error.details)
        assert "****" in error.message
    assert "gateway chat" in caplog.text
    assert secret not in caplog.text
    assert all(secret not in str(r.args) for r in caplog.records)
    assert secret not in repr(list(LlmCall.objects.values()))


def test_environment_key_wins(loopback_model, openai_server, fast_gateway, monkeypatch):
    provider = loopback_model.provider
    provider.set_api_key("stored-key-1234")
    provider.save()
    monkeypatch.setenv(provider.env_key_name, "env-key-5678")
    openai_server.api_key = "env-key-5678"
    assert gateway.chat(model=loopback_model.key, request=BODY).text.startswith("echo")


def test_unknown_disabled_unpriced_models(loopback_model, fast_gateway):
    with pytest.raises(gateway.UnknownModel) as caught:
        gateway.chat(model="nope/nothing", request=BODY)
    assert caught.value.status_code == 404
    loopback_model.enabled = False
    loopback_model.save()
    with pytest.raises(gateway.ModelDisabled):
        gateway.chat(model=loopback_model.key, request=BODY)
    loopback_model.enabled = True
    loopback_model.price_input_per_m = None
    loopback_model.save()
    with pytest.raises(gateway.ModelUnpriced) as caught:
        gateway.chat(model=loopback_model.key, request=BODY)
    assert caught.value.status_code == 403
    loopback_model.allow_unpriced = True
    loopback_model.save()
    assert gateway.chat(model=loopback_model.key, request=BODY).meta.cost == 0


@pytest.mark.parametrize(
    "request_body",
    [
        {"messages": []},
        {"messages": [{"content": "no role"}]},
        {"messages": [{"role": "user", "content": "x"}], "model": "other"},
        {"messages": [{"role": "user", "content": "x"}], "stream": True},
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
    ],
)
def test_bad_requests_are_refused_and_write_nothing(
    loopback_model, openai_server, fast_gateway, request_body
):
    with pytest.raises(gateway.InvalidRequest) as caught:
        gateway.chat(model=loopback_model.key, request=request_body)
    assert caught.value.status_code == 422
    assert openai_server.calls() == []
    assert not LlmCall.objects.exists()


def test_embeddings_through_openai_provider(loopback_model, openai_server, fast_gateway):
    loopback_model.capabilities = ["chat", "embeddings"]
    loopback_model.save()
    result = gateway.embed(model=loopback_model.key, input=["one two", "three"])
    assert [row["index"] for row in result.response["data"]] == [0, 1]
    assert len(result.embeddings[0]) == 8
    assert result.meta.prompt_tokens == 3
    assert openai_server.calls("/embeddings")[0].body["input"] == ["one two", "three"]
    assert LlmCall.objects.get().operation == "embeddings"


def test_list_models_through_the_provider(loopback_model, openai_server):
    adapter = gateway.provider_for(loopback_model.provider)
    assert [m["id"] for m in adapter.list_models()] == ["test-chat", "test-embed"]


def test_registry_rows_are_cached_until_a_change(loopback_model, fast_gateway, openai_server):
    from jobs.models import RegisteredModel

    gateway.chat(model=loopback_model.key, request=BODY, cache="no-store")
    # A queryset update sends no signal: the process keeps its copy until reset_caches().
    RegisteredModel.objects.filter(pk=loopback_model.pk).update(enabled=False)
    gateway.chat(model=loopback_model.key, request=BODY, cache="no-store")
    gateway.reset_caches()
    with pytest.raises(gateway.ModelDisabled):
        gateway.chat(model=loopback_model.key, request=BODY, cache="no-store")
    # A save (the settings page, the admin, the services) drops it at once.
    loopback_model.refresh_from_db()
    loopback_model.enabled = True
    loopback_model.save()
    assert gateway.chat(model=loopback_model.key, request=BODY, cache="no-store").meta.attempts == 1
