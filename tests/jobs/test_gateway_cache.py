"""The exact-match cache: every field of the request (and the run index, the model revision)
changes the key; a hit returns the stored bytes at cost 0 and is recorded as cached."""

import pytest

from billing.models import LlmCall
from jobs import gateway
from jobs.gateway.cache import cache_key

pytest_plugins = ["tests.jobs.openai_server"]
pytestmark = pytest.mark.django_db

BASE = {
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    "temperature": 0.7,
    "top_p": 0.9,
    "max_tokens": 32,
    "seed": 1,
    "stop": ["\n\n"],
    "response_format": {"type": "text"},
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
}
KEY_ARGS = {
    "provider": "hf-router",
    "remote_id": "meta-llama/Llama-3.1-8B-Instruct",
    "revision": "",
    "operation": "chat",
    "run_index": None,
}


def _key(body=BASE, **overrides):
    return cache_key(body=body, **{**KEY_ARGS, **overrides})


def test_key_is_canonical():
    reordered = dict(reversed(list(BASE.items())))
    assert _key(reordered) == _key(BASE)
    assert len(_key()) == 64


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("messages", [{"role": "user", "content": "hi!"}]),
        ("temperature", 0.0),
        ("top_p", 1.0),
        ("max_tokens", 33),
        ("seed", 2),
        ("stop", ["END"]),
        ("response_format", {"type": "json_object"}),
        ("tools", []),
        ("presence_penalty", 0.1),  # a field the base request does not have
    ],
)
def test_every_request_field_changes_the_key(field, value):
    assert _key({**BASE, field: value}) != _key()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("provider", "openai"),
        ("remote_id", "meta-llama/Llama-3.1-70B-Instruct"),
        ("revision", "sha256:abc"),
        ("operation", "embeddings"),
        ("run_index", 0),
    ],
)
def test_model_revision_and_run_index_change_the_key(name, value):
    assert _key(**{name: value}) != _key()


def test_run_indexes_are_distinct():
    assert len({_key(run_index=i) for i in range(5)}) == 5


BODY = {"messages": [{"role": "user", "content": "cache me"}], "max_tokens": 8}


def test_hit_is_byte_identical_free_and_recorded_cached(
    loopback_model, openai_server, fast_gateway
):
    first = gateway.chat(model=loopback_model.key, request=BODY)
    second = gateway.chat(model=loopback_model.key, request=BODY)
    assert first.meta.cached is False and second.meta.cached is True
    assert second.raw == first.raw
    assert second.response == first.response
    assert second.text == first.text == "echo: cache me"
    assert first.meta.cost > 0 and second.meta.cost == 0
    assert second.meta.attempts == 0
    assert second.meta.cache_key == first.meta.cache_key
    assert len(openai_server.calls()) == 1
    rows = list(LlmCall.objects.order_by("id").values_list("cached", "cost", "outcome"))
    assert [(c, float(cost), o) for c, cost, o in rows] == [
        (False, float(first.meta.cost), "ok"),
        (True, 0.0, "ok"),
    ]
    # The tokens the hit would have cost are still recorded.
    assert LlmCall.objects.get(cached=True).prompt_tokens == first.meta.prompt_tokens


def test_run_index_is_part_of_the_key(loopback_model, openai_server, fast_gateway):
    for i in range(3):
        assert not gateway.chat(model=loopback_model.key, request=BODY, run_index=i).meta.cached
    assert gateway.chat(model=loopback_model.key, request=BODY, run_index=1).meta.cached
    assert len(openai_server.calls()) == 3


def test_no_store_and_refresh(loopback_model, openai_server, fast_gateway):
    gateway.chat(model=loopback_model.key, request=BODY, cache="no-store")
    assert not gateway.chat(model=loopback_model.key, request=BODY).meta.cached  # not stored
    refreshed = gateway.chat(model=loopback_model.key, request=BODY, cache="refresh")
    assert refreshed.meta.cached is False  # looked past the stored answer
    assert gateway.chat(model=loopback_model.key, request=BODY).meta.cached
    assert len(openai_server.calls()) == 3
    with pytest.raises(gateway.InvalidRequest):
        gateway.chat(model=loopback_model.key, request=BODY, cache="sometimes")


def test_new_revision_misses(loopback_model, openai_server, fast_gateway):
    gateway.chat(model=loopback_model.key, request=BODY)
    loopback_model.revision = "sha256:new-adapter"
    loopback_model.save()
    assert gateway.chat(model=loopback_model.key, request=BODY).meta.cached is False
    assert len(openai_server.calls()) == 2


def test_failures_are_not_cached(loopback_model, openai_server, fast_gateway):
    openai_server.fail(400)
    with pytest.raises(gateway.ProviderError):
        gateway.chat(model=loopback_model.key, request=BODY)
    assert gateway.chat(model=loopback_model.key, request=BODY).meta.cached is False
