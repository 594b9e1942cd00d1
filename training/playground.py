"""Playground generation: one prompt answered by the base model and by a job's LoRA adapter.

Both answers come from the model gateway (``chat``), like every LLM call in Crucible, through
the LLM port (config/llm.py; jobs fills it in, training never imports jobs): the job's adapter
is registered as an offline model on top of its base (``llm.adapter_model``, jobs'
``adapter_model_register``: key ``offline/crucible-<job id>``, revision = the adapter's
checksum), and the gateway's offline provider loads it (once per process, through
``gpu/generate.py``). Each answer is one ledger row with feature "playground" and the
playground run as its subject; the same prompt and decoding again is an exact-cache hit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

logger = logging.getLogger("crucible.training.playground")

DEFAULT_MAX_NEW_TOKENS = 96
MAX_NEW_TOKENS_LIMIT = 512
MAX_PROMPT_CHARS = 4000


@dataclass(frozen=True)
class Decoding:
    """Decoding settings, recorded with every run. ``temperature == 0`` means greedy."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.1
    seed: int = 42

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def as_dict(self) -> dict:
        return {**asdict(self), "do_sample": self.do_sample}


@dataclass
class PairResult:
    base_output: str
    adapter_output: str
    device: str
    timings: dict = field(default_factory=dict)
    token_counts: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)  # the gateway model keys of both sides


# --- Generation through the gateway -------------------------------------------------------------


def _request(messages: list[dict], decoding: Decoding) -> dict:
    """The OpenAI chat body for ``decoding`` (``repetition_penalty`` is the offline provider's
    extension, as vLLM's; the base and the adapter are both offline models)."""
    return {
        "messages": messages,
        "max_tokens": decoding.max_new_tokens,
        "temperature": decoding.temperature,
        "top_p": decoding.top_p if decoding.do_sample else 1.0,
        "seed": decoding.seed,
        "repetition_penalty": decoding.repetition_penalty,
    }


def generate_pair(
    *,
    job,
    prompt: str,
    system_prompt: str = "",
    decoding: Decoding,
    user=None,
    subject=None,
    stage: Callable[[str], None] = lambda s: None,
) -> PairResult:
    """The base model's and the job's adapter's answer to one prompt, with timings, both
    through the model gateway (feature "playground", ``subject`` in the ledger)."""
    from django.conf import settings

    from config import llm
    from gpu.generate import resolve_device

    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}
    ]
    stage("Registering the adapter")
    adapter_model = llm.adapter_model(job=job)
    caller = llm.caller(user=user, feature="playground", subject=subject)
    request = _request(messages, decoding)
    # A background task: wait for a rate limit rather than fail (interactive=False).
    stage("Generating with the base model")
    base = llm.chat(model=adapter_model.parent, request=request, caller=caller, interactive=False)
    stage("Generating with the adapter")
    tuned = llm.chat(model=adapter_model.key, request=request, caller=caller, interactive=False)
    return PairResult(
        base_output=base.text.strip(),
        adapter_output=tuned.text.strip(),
        device=resolve_device(getattr(settings, "GATEWAY_OFFLINE_DEVICE", "auto")),
        timings={
            "base_generate_s": round(base.meta.latency_ms / 1000, 3),
            "adapter_generate_s": round(tuned.meta.latency_ms / 1000, 3),
            "cached": base.meta.cached and tuned.meta.cached,
        },
        token_counts={
            "base": base.meta.completion_tokens,
            "adapter": tuned.meta.completion_tokens,
        },
        models={"base": adapter_model.parent, "adapter": adapter_model.key},
    )
