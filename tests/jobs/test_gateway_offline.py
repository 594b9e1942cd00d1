"""The offline provider: SmolLM2-135M-Instruct chat and all-MiniLM-L6-v2 embeddings on this
machine, through the gateway, registered by the data migration (price 0)."""

import math
import os
from pathlib import Path

import pytest

from billing.models import LlmCall
from jobs import gateway
from jobs.models import Provider, RegisteredModel

pytestmark = pytest.mark.django_db

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _offline_rows():
    """The data migration's rows (a transactional test elsewhere flushes the database, and a
    flush does not re-run data migrations)."""
    import importlib

    from django.apps import apps

    migration = importlib.import_module("jobs.migrations.0002_offline_provider")
    migration.register(apps, None)


@pytest.fixture(autouse=True)
def _model_cache(settings):
    # The converted offline model is cached once per checkout (var/models), like the other
    # offline-model tests; a fresh data folder would convert the GGUF again.
    settings.TRAINING_MODEL_CACHE = os.environ.get(
        "CRUCIBLE_MODEL_CACHE", str(REPO / "var" / "models")
    )
    settings.GATEWAY_OFFLINE_DEVICE = "cpu"


def test_data_migration_registers_the_offline_models():
    provider = Provider.objects.get(slug="offline")
    assert provider.kind == "offline" and provider.enabled
    keys = {m.key: m for m in RegisteredModel.objects.filter(provider=provider)}
    assert set(keys) == {"offline/smollm2-135m-instruct", "offline/all-minilm-l6-v2"}
    chat = keys["offline/smollm2-135m-instruct"]
    assert chat.capabilities == ["chat"] and chat.price_source == "local"
    assert chat.price_input_per_m == 0 and chat.price_output_per_m == 0
    assert keys["offline/all-minilm-l6-v2"].capabilities == ["embeddings"]
    assert [m.key for m in gateway.models(capability="embeddings")] == ["offline/all-minilm-l6-v2"]
    assert "offline/smollm2-135m-instruct" in [m.key for m in gateway.models(capability="chat")]


def test_offline_chat_exact_tokens_openai_shape():
    request = {
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 6,
        "temperature": 0,
    }
    result = gateway.chat(model="offline/smollm2-135m-instruct", request=request)
    body = result.response
    assert body["object"] == "chat.completion" and body["model"] == "smollm2-135m-instruct"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and result.text == choice["message"]["content"]
    assert result.text and choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 6
    # Exact counts from the model's own tokenizer and chat template.
    from gpu.generate import count_chat_tokens, load_lm
    from gpu.model import ensure_offline_model

    loaded = load_lm(
        ensure_offline_model(
            "SmolLM2-135M-Instruct",
            Path(os.environ.get("CRUCIBLE_MODEL_CACHE", str(REPO / "var" / "models"))),
        ),
        device="cpu",
    )
    assert usage["prompt_tokens"] == count_chat_tokens(loaded.tokenizer, request["messages"])
    assert result.meta.cost == 0 and result.meta.provider == "offline"
    hit = gateway.chat(model="offline/smollm2-135m-instruct", request=request)
    assert hit.meta.cached and hit.raw == result.raw
    assert LlmCall.objects.filter(model="offline/smollm2-135m-instruct", outcome="ok").count() == 2


def test_offline_embeddings_are_384_dim_normalised():
    texts = ["A budget for the month.", "Monthly spending plan.", "The cat sat on the mat."]
    result = gateway.embed(model="offline/all-minilm-l6-v2", input=texts)
    vectors = result.embeddings
    assert [row["index"] for row in result.response["data"]] == [0, 1, 2]
    assert all(len(v) == 384 for v in vectors)
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-5) for v in vectors)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    # Related sentences are closer than unrelated ones.
    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])
    assert result.response["usage"]["prompt_tokens"] > len(texts)
    assert gateway.embed(model="offline/all-minilm-l6-v2", input=texts).meta.cached


def test_capability_is_checked():
    with pytest.raises(gateway.InvalidRequest):
        gateway.embed(model="offline/smollm2-135m-instruct", input="x")


@pytest.mark.slow
def test_offline_adapter_model_loads_its_adapter_from_storage(tmp_path, settings):
    """A RegisteredModel with adapter_uri: the provider copies the adapter out of storage
    (once per revision) and serves base + LoRA; the answer differs from the base model's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from config.storage import storage_save
    from gpu.model import ensure_offline_model

    settings.DATA_DIR = tmp_path
    base_dir = ensure_offline_model("SmolLM2-135M-Instruct", Path(settings.TRAINING_MODEL_CACHE))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=64,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        ),
    )
    local = tmp_path / "adapter"
    peft_model.save_pretrained(str(local))
    for path in local.rglob("*"):
        if path.is_file():
            storage_save(f"tests/gateway-adapter/{path.relative_to(local)}", path.read_bytes())
    adapter = RegisteredModel.objects.create(
        provider=Provider.objects.get(slug="offline"),
        remote_id="adapter-test",
        parent="offline/smollm2-135m-instruct",
        adapter_uri="tests/gateway-adapter",
        revision="sha256:test-adapter",
        price_input_per_m=0,
        price_output_per_m=0,
        price_source="local",
        capabilities=["chat"],
    )
    request = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 5}
    tuned = gateway.chat(model=adapter.key, request=request)
    base = gateway.chat(model="offline/smollm2-135m-instruct", request=request)
    assert tuned.text and tuned.text != base.text
    assert (tmp_path / "gateway-adapters" / "sha256_test-adapter" / "adapter_config.json").is_file()
    assert tuned.meta.cache_key != base.meta.cache_key
