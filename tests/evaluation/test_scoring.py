"""Scoring with the real offline model (SmolLM2-135M-Instruct) and a tiny random LoRA adapter.

Kept small: a handful of questions, short conversations, few new tokens.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see tests/gpu/conftest.py

from evaluation import scoring
from evaluation.suites import load_suite

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
OFFLINE = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def one_thread():
    # On the shared 2-core machine one torch thread is several times faster than two
    # spinning ones (measured 2.6 s vs 14 s for a 4x93-token forward pass under load).
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_dir():
    from gpu.model import ensure_offline_model

    os.environ.setdefault("CRUCIBLE_MODEL_CACHE", str(REPO / "var" / "models"))
    return ensure_offline_model(OFFLINE)


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory, one_thread):
    """A LoRA adapter with random (non-zero) weights: no training, but it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    target = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(str(target))
    return target


@pytest.fixture(scope="module")
def models(base_dir, adapter_dir, one_thread):
    return scoring.load_models(
        base_model_dir=str(base_dir), adapter_dir=str(adapter_dir), device="cpu"
    )


def _short_documents(n: int = 2) -> list[list[dict]]:
    from gpu.data import read_training_file

    conversations = read_training_file(REPO / "samples" / "training" / "financial_advisor_v1.jsonl")
    # system + first exchange: realistic text, short enough for a quick test
    return [c.messages[:3] for c in conversations[:n]]


def test_models_load_once_with_the_adapter(models):
    assert models.has_adapter and models.device == "cpu"
    assert models.renderer.eot_token == "<|im_end|>"
    with pytest.raises(ValueError, match="no adapter"):
        base_only = scoring.Models(
            model=models.model.get_base_model(),
            tokenizer=models.tokenizer,
            device="cpu",
            has_adapter=False,
            renderer=models.renderer,
        )
        scoring.option_logliks(base_only, [], use_adapter=True)


def test_document_nll_is_the_worker_perplexity_method(models):
    from gpu.data import Conversation
    from gpu.perplexity import baseline_and_trained, make_windows

    documents = _short_documents(1)
    max_length = 64  # several windows
    base = scoring.document_nll(models, documents, use_adapter=False, max_length=max_length)
    trained = scoring.document_nll(models, documents, use_adapter=True, max_length=max_length)
    encoded = [
        models.renderer.encode(Conversation(row=i + 1, id=str(i), messages=m))
        for i, m in enumerate(documents)
    ]
    windows = make_windows(encoded, max_length)
    assert len(windows) >= 3
    worker = baseline_and_trained(models.model, windows, models.device)
    tokens = sum(d.tokens for d in base)
    assert tokens == worker["eval_tokens"] == sum(d.tokens for d in trained)
    assert math.exp(sum(d.nll_sum for d in base) / tokens) == pytest.approx(
        worker["baseline"], rel=1e-6
    )
    assert math.exp(sum(d.nll_sum for d in trained) / tokens) == pytest.approx(
        worker["trained"], rel=1e-6
    )
    # the random adapter really changes the model
    assert worker["baseline"] != pytest.approx(worker["trained"], rel=1e-3)


def test_option_logliks_beat_chance_and_the_prompt_cache_changes_nothing(models):
    items = load_suite("knowledge_retention").items
    # a fixed rule, not chosen by outcome: the first two questions of each category
    questions = [
        q
        for category in ("taxes", "retirement", "investing", "insurance")
        for q in [i for i in items if i["category"] == category][:2]
    ]
    base = scoring.option_logliks(models, questions, use_adapter=False)
    correct = scoring.mcq_correct(base, [q["answer"] for q in questions])
    assert all(len(row) == 4 and all(v < 0 for v in row) for row in base)
    # Measured on this machine (suite 1.1.0, per-character scores): 4 of these 8 right (chance
    # 2), and 30/100 on the whole suite against 25 by chance: the 135M offline model knows
    # little personal finance, so a handful of questions cannot prove it beats chance. What is
    # asserted is the measured floor, the scoring direction on a question whose prompt states
    # the answer, and that the prompt cache changes no number.
    assert sum(correct) >= 3
    stated = {
        "question": "The correct answer is Madrid. Which city is the correct answer?",
        "options": ["Paris", "Madrid", "Rome", "Berlin"],
        "answer": 1,
    }
    scores = scoring.option_logliks(models, [stated], use_adapter=False)
    assert scoring.mcq_correct(scores, [1]) == [True]
    reference = scoring.option_logliks_unshared(models, questions[:2], use_adapter=False)
    for row, full in zip(base[:2], reference, strict=True):
        assert row == pytest.approx(full, abs=1e-5)
    trained = scoring.option_logliks(models, questions[:1], use_adapter=True)
    assert trained[0] != pytest.approx(base[0], abs=1e-4)


def test_mcq_correct_takes_the_highest_option():
    assert scoring.mcq_correct([[-1.0, -0.5, -2, -3], [-1, -1, -1, -1]], [1, 2]) == [True, False]


def test_generation_stop_flags_and_left_padding(models):
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Explain in detail how a Roth IRA works."}],
    ]
    batched = scoring.generate(
        models, conversations, use_adapter=False, max_new_tokens=16, seed=0, batch_size=2
    )
    # measured: "Hello! How can I assist you today?" (10 tokens with <|im_end|>), then a long
    # answer cut at the limit
    assert batched[0].stopped is True and batched[0].new_tokens < 16
    assert batched[0].text and "<|im_end|>" not in batched[0].text
    assert batched[1].stopped is False and batched[1].new_tokens == 16
    alone = scoring.generate(
        models, conversations[:1], use_adapter=False, max_new_tokens=16, seed=0, batch_size=1
    )
    assert alone[0].text == batched[0].text  # left padding does not change the reply
    trained = scoring.generate(
        models, conversations[1:], use_adapter=True, max_new_tokens=16, seed=0
    )
    assert trained[0].text != batched[1].text  # the adapter toggle reaches generation
    sampled = scoring.generate(
        models, conversations[1:], use_adapter=False, max_new_tokens=8, seed=3, temperature=1.0
    )
    again = scoring.generate(
        models, conversations[1:], use_adapter=False, max_new_tokens=8, seed=3, temperature=1.0
    )
    assert sampled[0].text == again[0].text  # seeded sampling is reproducible


def test_offline_judge_scores_every_dimension_from_digit_likelihoods(models):
    rubric = load_suite("emotional_intelligence").rubric
    prompt = "I lost my job yesterday and I'm scared about rent."
    response = "I'm so sorry, that is frightening. First, check your unemployment benefits today."
    scores = scoring.judge_offline(models, rubric=rubric, prompt=prompt, response=response)
    assert set(scores) == {"empathy", "clarity", "appropriateness"}
    assert all(isinstance(v, int) and 1 <= v <= 5 for v in scores.values())
