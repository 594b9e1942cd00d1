"""The model server (gpu/serve.py) through the real ``openai`` SDK against uvicorn on a
loopback port: models, chat (plain and streamed, exact usage), embeddings, LoRA adapters
loaded and unloaded at run time, and dynamic batching."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

BASE_ID = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "Name one colour of the sky."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapter(base_dir, target, seed: int):
    """A LoRA adapter with random (non-zero) B weights: untrained, but it changes answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=64,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(model, config).save_pretrained(str(target))
    return target


@pytest.fixture(scope="module")
def adapters(offline_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(offline_model_dir, root / f"a{i}", 100 + i) for i in range(3)]


@pytest.fixture(scope="module")
def server(offline_model_dir, adapters):
    import uvicorn

    from gpu.serve import Engine, create_app

    engine = Engine(
        offline_model_dir,
        base_id=BASE_ID,
        device="cpu",
        max_adapters=2,
        batch_window_ms=30,
        max_batch=8,
        adapter_root=adapters[0].parent,
    )
    port = _free_port()
    config = uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    assert uv.started
    yield {"engine": engine, "url": f"http://127.0.0.1:{port}", "adapters": adapters}
    uv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)


def test_health_and_models_list_base_and_embedder(server, client):
    import httpx

    health = httpx.get(server["url"] + "/health").json()
    assert health["status"] == "ok" and health["base"] == BASE_ID
    ids = [m.id for m in client.models.list().data]
    assert ids[:2] == [BASE_ID, "all-minilm-l6-v2"]


def test_chat_non_streaming_has_exact_usage(server, client):
    from gpu.generate import count_chat_tokens

    reply = client.chat.completions.create(
        model=BASE_ID, messages=QUESTION, max_tokens=12, temperature=0, seed=1
    )
    text = reply.choices[0].message.content
    assert text.strip()
    tokenizer = server["engine"].tokenizer
    assert reply.usage.prompt_tokens == count_chat_tokens(tokenizer, QUESTION)
    assert 1 <= reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")
    if reply.choices[0].finish_reason == "length":
        assert reply.usage.completion_tokens == 12


def test_chat_streaming_matches_and_ends_with_usage(server, client):
    plain = client.chat.completions.create(
        model=BASE_ID, messages=QUESTION, max_tokens=12, temperature=0, seed=1
    )
    stream = client.chat.completions.create(
        model=BASE_ID,
        messages=QUESTION,
        max_tokens=12,
        temperature=0,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) >= 2  # really streamed, not one blob
    assert "".join(pieces).strip() == plain.choices[0].message.content
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == plain.choices[0].finish_reason


def test_stream_ends_with_done_on_the_wire(server):
    import httpx

    body = {"model": BASE_ID, "messages": QUESTION, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_embeddings_are_384_dimensional(client):
    out = client.embeddings.create(model="all-minilm-l6-v2", input=["hello", "a second text"])
    assert [len(d.embedding) for d in out.data] == [384, 384]
    assert out.usage.prompt_tokens > 0


def test_adapter_load_chat_differs_and_unload(server, client):
    import httpx

    url = server["url"]
    path = str(server["adapters"][1])
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "tuned", "lora_path": path})
    assert r.status_code == 200 and "tuned" in r.text
    listed = {m.id: m for m in client.models.list().data}
    assert listed["tuned"].model_extra["parent"] == BASE_ID
    assert listed["tuned"].model_extra["root"] == path
    kwargs = {"messages": QUESTION, "max_tokens": 16, "temperature": 0, "seed": 7}
    base = client.chat.completions.create(model=BASE_ID, **kwargs).choices[0].message.content
    tuned = client.chat.completions.create(model="tuned", **kwargs).choices[0].message.content
    assert tuned != base
    # the base model is still itself after the adapter ran
    again = client.chat.completions.create(model=BASE_ID, **kwargs).choices[0].message.content
    assert again == base
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "tuned"})
    assert r.status_code == 200
    assert "tuned" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="tuned", **kwargs)


def test_bad_requests_are_clear(server, client):
    import httpx

    r = httpx.post(server["url"] + "/v1/load_lora_adapter", json={"lora_name": "x"})
    assert r.status_code == 400 and "lora_path" in r.json()["error"]["message"]
    r = httpx.post(
        server["url"] + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nope"}
    )
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=BASE_ID, messages=[])


def test_adapter_root_lru_and_batching(server, client):
    """Three adapters from the adapter root with K=2 resident; concurrent requests for one
    adapter share a generate call, and every answer equals its one-at-a-time answer."""
    engine = server["engine"]
    names = [p.name for p in server["adapters"]]
    kwargs = {"messages": QUESTION, "max_tokens": 8, "temperature": 0, "seed": 3}
    alone = {
        n: client.chat.completions.create(model=n, **kwargs).choices[0].message.content
        for n in names
    }
    assert len(engine.resident) == 2 and set(engine.resident) <= set(names)
    batches_before = engine.stats["batches"]
    with ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(client.chat.completions.create, model=n, **kwargs) for n in names * 2]
        answers = [j.result() for j in jobs]
    assert [a.choices[0].message.content for a in answers] == [alone[n] for n in names * 2]
    # six requests over three adapters in fewer than six generate calls
    assert engine.stats["batches"] - batches_before < 6
    assert max(a.model_extra["crucible"]["batch_size"] for a in answers) >= 2
