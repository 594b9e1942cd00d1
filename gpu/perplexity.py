"""Held-out perplexity (PROTOCOL.md §5).

Each validation conversation is rendered and tokenized once (the same assistant-only labels as
training, untruncated); sequences longer than max_seq_length are cut into non-overlapping
windows of max_seq_length tokens. Within a window token t is scored from tokens < t, so the
first token of each window is not counted. ``ppl = exp(sum NLL / counted tokens)``. The base
model (adapter disabled) and the adapter see exactly the same windows.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

from gpu.data import IGNORE, Encoded

METHOD = (
    "token-level perplexity on the held-out split: chat-template rendering, assistant-turn tokens "
    "only, non-overlapping windows of max_seq_length tokens, identical windows for base and adapter"
)


@dataclass
class Window:
    input_ids: list[int]
    labels: list[int]

    @property
    def counted(self) -> int:
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def make_windows(encoded: list[Encoded], max_seq_length: int) -> list[Window]:
    windows = []
    for e in encoded:
        for start in range(0, len(e.input_ids), max_seq_length):
            window = Window(
                e.input_ids[start : start + max_seq_length],
                e.labels[start : start + max_seq_length],
            )
            if window.counted:
                windows.append(window)
    return windows


@dataclass
class PerplexityResult:
    perplexity: float | None
    nll_sum: float
    tokens: int

    @property
    def mean_nll(self) -> float | None:
        return self.nll_sum / self.tokens if self.tokens else None


def evaluate(model, windows: list[Window], device) -> PerplexityResult:
    """Sum of token NLL over the windows, one window per forward pass."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    try:
        with torch.inference_mode():
            for window in windows:
                ids = torch.tensor([window.input_ids], device=device)
                labels = torch.tensor([window.labels], device=device)
                logits = model(input_ids=ids, use_cache=False).logits.float()
                shift_logits = logits[0, :-1]
                shift_labels = labels[0, 1:]
                nll += F.cross_entropy(
                    shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum"
                ).item()
                tokens += int((shift_labels != IGNORE).sum())
    finally:
        model.train(was_training)
    ppl = math.exp(nll / tokens) if tokens else None
    return PerplexityResult(ppl, nll, tokens)


def baseline_and_trained(peft_model, windows: list[Window], device) -> dict:
    """Both perplexities on the same windows: the base (adapter disabled) and the adapter."""
    disable = getattr(peft_model, "disable_adapter", None)
    with disable() if disable else contextlib.nullcontext():
        base = evaluate(peft_model, windows, device)
    trained = evaluate(peft_model, windows, device)
    improvement = None
    if base.perplexity and trained.perplexity:
        improvement = round((base.perplexity - trained.perplexity) / base.perplexity * 100, 3)
    return {
        "baseline": base.perplexity,
        "trained": trained.perplexity,
        "improvement_pct": improvement,
        "eval_tokens": trained.tokens,
        "method": METHOD,
        "_trained_mean_nll": trained.mean_nll,
    }
