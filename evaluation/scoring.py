"""Model scoring for validation runs: held-out NLL, multiple-choice log-likelihoods, batched
generation and an offline rubric judge. CPU or CUDA; torch/transformers/peft are imported lazily.

One base model is loaded once; the adapter (PEFT) is switched off with ``disable_adapter()`` for
baseline numbers, so baseline and trained always see the same weights, tokenizer, chat template
and inputs. Nothing here parses free text: multiple choice and the offline judge compare
log-likelihoods.

Methods (the report's appendix quotes ``METHODS``):
- perplexity: ``gpu/perplexity.py`` itself (assistant-turn tokens, non-overlapping windows).
- multiple choice: each option is scored as the assistant's reply to the question (the question
  lists the four options); score = summed log-probability of the option's tokens divided by
  its length in characters (the end-of-turn token is not counted), so neither long options
  (raw sums) nor options whose later tokens are near-certain (per-token means) are favoured.
- generation: the chat template with the generation prompt, left-padded batches, greedy decoding
  at temperature 0 (seeded sampling otherwise); ``stopped`` = the model emitted its end-of-turn
  or EOS token within ``max_new_tokens``.
- offline judge: for each rubric dimension a scoring prompt (the dimension, its 1-5 anchors, the
  client message and the reply) is followed by the assistant prompt; the score is the digit
  "1".."5" with the highest next-token log-probability. Adapter disabled.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from gpu.data import IGNORE, ChatRenderer, Conversation
from gpu.perplexity import evaluate as perplexity_evaluate
from gpu.perplexity import make_windows

METHODS = {
    "perplexity": (
        "token-level NLL on the held-out conversations (gpu/perplexity.py): chat-template "
        "rendering, assistant-turn tokens only, non-overlapping windows, identical windows for "
        "baseline and trained; corpus perplexity = exp(sum NLL / sum tokens)"
    ),
    "knowledge_retention": (
        "each of the four options scored as the assistant's reply to the question (options "
        "listed in the question); score = summed log-probability of the option's tokens per "
        "character of the option (end-of-turn excluded); the highest-scoring option is the "
        "model's answer; no free-text parsing"
    ),
    "generation": (
        "chat template with generation prompt, left-padded batches, greedy decoding at "
        "temperature 0 (seeded sampling otherwise); a response 'stopped' when the model emitted "
        "its end-of-turn/EOS token before the token limit"
    ),
    "offline_judge": (
        "the offline base model (adapter disabled) reads a scoring prompt with the rubric "
        "dimension and its 1-5 anchors; the score is the digit 1-5 with the highest next-token "
        "log-probability (no free-text parsing)"
    ),
}
MCQ_LETTERS = "ABCD"
SCORE_DIGITS = ("1", "2", "3", "4", "5")


@dataclass
class DocNLL:
    nll_sum: float
    tokens: int


@dataclass
class Generation:
    text: str
    stopped: bool
    new_tokens: int
    seconds: float  # wall time of the batch divided by its size


@dataclass
class Models:
    model: Any
    tokenizer: Any
    device: str
    has_adapter: bool
    renderer: ChatRenderer
    base_model_dir: str = ""
    adapter_dir: str | None = None


def load_models(*, base_model_dir: str, adapter_dir: str | None = None, device: str = "auto"):
    """The base model once (float32 on CPU, bf16/fp16 on CUDA) plus the PEFT adapter if given."""
    import torch
    from transformers import AutoModelForCausalLM

    from gpu.model import cuda_compute_dtype, load_tokenizer, resolve_device

    device = resolve_device("auto" if device == "auto" else device)
    tokenizer = load_tokenizer(str(base_model_dir))
    dtype = getattr(torch, cuda_compute_dtype()) if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        str(base_model_dir), dtype=dtype, attn_implementation="sdpa"
    ).to(device)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).to(device)
    model.eval()
    return Models(
        model=model,
        tokenizer=tokenizer,
        device=device,
        has_adapter=bool(adapter_dir),
        renderer=ChatRenderer(tokenizer),
        base_model_dir=str(base_model_dir),
        adapter_dir=str(adapter_dir) if adapter_dir else None,
    )


@contextlib.contextmanager
def adapter(models: Models, use_adapter: bool):
    """Adapter on (trained) or off (baseline) for the duration of the block."""
    if use_adapter and not models.has_adapter:
        raise ValueError("use_adapter=True but no adapter is loaded")
    if not use_adapter and models.has_adapter:
        with models.model.disable_adapter():
            yield
    else:
        yield


def _conversation(messages: list[dict], index: int) -> Conversation:
    return Conversation(row=index + 1, id=f"doc-{index + 1}", messages=list(messages))


# ------------------------------------------------------------------ perplexity


def document_nll(
    models: Models, documents: list[list[dict]], *, use_adapter: bool, max_length: int
) -> list[DocNLL]:
    """Summed NLL and scored-token count per document, by gpu/perplexity.py's method."""
    out = []
    with adapter(models, use_adapter):
        for i, messages in enumerate(documents):
            encoded = models.renderer.encode(_conversation(messages, i))
            windows = make_windows([encoded], max_length)
            if not windows:
                out.append(DocNLL(0.0, 0))
                continue
            result = perplexity_evaluate(models.model, windows, models.device)
            out.append(DocNLL(result.nll_sum, result.tokens))
    return out


# ------------------------------------------------------------------ multiple choice


def mcq_prompt(question: dict) -> str:
    lines = [question["question"], ""]
    lines += [f"{MCQ_LETTERS[i]}) {option}" for i, option in enumerate(question["options"])]
    lines += ["", "Reply with the text of the correct option."]
    return "\n".join(lines)


def mcq_reply(question: dict, index: int) -> str:
    return question["options"][index]


def _padded(models: Models, rows: list[list[int]], side: str):
    import torch

    pad = models.tokenizer.pad_token_id
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        fill = width - len(r)
        if side == "left":
            ids.append([pad] * fill + r)
            mask.append([0] * fill + [1] * len(r))
        else:
            ids.append(r + [pad] * fill)
            mask.append([1] * len(r) + [0] * fill)
    return (
        torch.tensor(ids, device=models.device),
        torch.tensor(mask, device=models.device),
    )


def _mcq_sequences(models: Models, question: dict, index: int) -> list[tuple[list[int], list[int]]]:
    """Per option: (token ids of the chat with the option as the reply, positions of the
    option's own tokens -- the end-of-turn token is not scored)."""
    prompt = mcq_prompt(question)
    out = []
    for i in range(len(question["options"])):
        reply = mcq_reply(question, i)
        encoded = models.renderer.encode(
            _conversation(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
                index,
            )
        )
        first, last = encoded.turns[-1]
        if encoded.input_ids[last] == models.renderer.eot_id:
            last -= 1
        out.append((encoded.input_ids, list(range(first, last + 1))))
    return out


def option_logliks(
    models: Models, questions: list[dict], *, use_adapter: bool, normalization: str = "chars"
) -> list[list[float]]:
    """Per question, each option's log-likelihood as the reply, normalised by its length.

    ``normalization``: "chars" (default) = summed log-probability / characters of the option,
    the usual "acc_norm" choice: dividing by tokens instead favours options whose later tokens
    are near-certain ("Mad|rid"), and the raw sum ("none") favours short options.

    The options of a question share the prompt: it is run once and its KV cache is repeated for
    the options (about 4x less compute than scoring four full sequences; the numbers are the
    same up to float rounding, see tests/evaluation/test_scoring.py).
    """
    sums = _option_sums(models, questions, use_adapter=use_adapter)
    return [
        [_normalise(total, n, question, i, normalization) for i, (total, n) in enumerate(row)]
        for question, row in zip(questions, sums, strict=True)
    ]


def _normalise(total: float, tokens: int, question: dict, index: int, how: str) -> float:
    if how == "chars":
        return total / max(len(mcq_reply(question, index)), 1)
    if how == "tokens":
        return total / max(tokens, 1)
    if how == "none":
        return total
    raise ValueError(f"unknown normalization {how!r} (chars, tokens or none)")


def _option_sums(
    models: Models, questions: list[dict], *, use_adapter: bool
) -> list[list[tuple[float, int]]]:
    """Per question and option: (summed log-probability of the option's tokens, token count)."""
    import torch

    out: list[list[tuple[float, int]]] = []
    with adapter(models, use_adapter), torch.inference_mode():
        for qi, question in enumerate(questions):
            sequences = _mcq_sequences(models, question, qi)
            shared = min(min(p) for _, p in sequences)  # never share a scored token
            for ids, _ in sequences[1:]:
                pairs = zip(sequences[0][0][:shared], ids, strict=False)
                shared = next((i for i, (a, b) in enumerate(pairs) if a != b), shared)
            prefix = torch.tensor([sequences[0][0][:shared]], device=models.device)
            # logits only where a scored token is predicted: the last prefix position and the
            # suffix positions up to the last option token (the lm_head over the whole prompt
            # was most of the compute)
            first = models.model(input_ids=prefix, use_cache=True, logits_to_keep=1)
            cache = getattr(first, "cache", None) or first.past_key_values
            cache.batch_repeat_interleave(len(sequences))
            suffixes = [ids[shared:] for ids, _ in sequences]
            ids, mask = _padded(models, suffixes, "right")
            full_mask = torch.cat(
                [torch.ones(len(sequences), shared, dtype=mask.dtype, device=mask.device), mask],
                dim=1,
            )
            needed = max(max(p) for _, p in sequences) - shared  # suffix logits 0..needed-1
            rest = models.model(
                input_ids=ids,
                attention_mask=full_mask,
                cache=cache,
                use_cache=True,
                logits_to_keep=torch.arange(max(needed, 1), device=models.device),
            )
            head = torch.log_softmax(first.logits[0, -1].float(), dim=-1)
            tail = torch.log_softmax(rest.logits.float(), dim=-1)
            row = []
            for r, (tokens, positions) in enumerate(sequences):
                # token p is predicted by the logits at p - 1
                values = [
                    (head if p - 1 < shared else tail[r, p - 1 - shared])[tokens[p]].item()
                    for p in positions
                ]
                row.append((sum(values), len(values)))
            out.append(row)
    return out


def option_logliks_unshared(
    models: Models, questions: list[dict], *, use_adapter: bool, normalization: str = "chars"
) -> list[list[float]]:
    """The same scores, each option as one full sequence (reference for the cached version)."""
    import torch

    out = []
    with adapter(models, use_adapter), torch.inference_mode():
        for qi, question in enumerate(questions):
            sequences = _mcq_sequences(models, question, qi)
            ids, mask = _padded(models, [s[0] for s in sequences], "right")
            logits = models.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            out.append(
                [
                    _normalise(
                        sum(logprobs[r, p - 1, tokens[p]].item() for p in positions),
                        len(positions),
                        question,
                        r,
                        normalization,
                    )
                    for r, (tokens, positions) in enumerate(sequences)
                ]
            )
    return out


def mcq_correct(logliks: list[list[float]], answers: list[int]) -> list[bool]:
    """Whether the highest-scoring option is the key (ties go to the first option)."""
    if len(logliks) != len(answers):
        raise ValueError("one answer per question")
    return [
        max(range(len(row)), key=row.__getitem__) == a
        for row, a in zip(logliks, answers, strict=True)
    ]


# ------------------------------------------------------------------ generation


def _stop_ids(models: Models) -> list[int]:
    ids = {models.renderer.eot_id}
    if models.tokenizer.eos_token_id is not None:
        ids.add(models.tokenizer.eos_token_id)
    return sorted(ids)


def generate(
    models: Models,
    conversations: list[list[dict]],
    *,
    use_adapter: bool,
    max_new_tokens: int,
    seed: int,
    temperature: float = 0.0,
    batch_size: int = 8,
) -> list[Generation]:
    """Replies to each conversation, in order; batched with left padding."""
    import torch

    stop_ids = _stop_ids(models)
    prompts = [
        models.tokenizer(
            models.renderer.render(messages, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        for messages in conversations
    ]
    results: list[Generation] = []
    with adapter(models, use_adapter), torch.inference_mode():
        for b, start in enumerate(range(0, len(prompts), batch_size)):
            chunk = prompts[start : start + batch_size]
            ids, mask = _padded(models, chunk, "left")
            kwargs: dict[str, Any] = {"do_sample": False}
            if temperature > 0:
                torch.manual_seed(seed + b)
                kwargs = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
            started = time.perf_counter()
            output = models.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=stop_ids,
                pad_token_id=models.tokenizer.pad_token_id,
                use_cache=True,
                **kwargs,
            )
            seconds = (time.perf_counter() - started) / len(chunk)
            for row in output[:, ids.shape[1] :].tolist():
                end = next((i for i, t in enumerate(row) if t in stop_ids), None)
                stopped = end is not None
                kept = row[:end] if stopped else row
                results.append(
                    Generation(
                        text=models.tokenizer.decode(kept, skip_special_tokens=True).strip(),
                        stopped=stopped,
                        new_tokens=end + 1 if stopped else len(row),
                        seconds=round(seconds, 4),
                    )
                )
    return results


# ------------------------------------------------------------------ offline judge


def judge_prompt(dimension: dict, prompt: str, response: str) -> str:
    anchors = "\n".join(f"{k}: {dimension['anchors'][k]}" for k in SCORE_DIGITS)
    return (
        "You are grading a financial advisor's reply to a client.\n\n"
        f"Criterion: {dimension['name']}. {dimension['description']}\n"
        f"Scale:\n{anchors}\n\n"
        f"Client message:\n{prompt}\n\n"
        f"Advisor reply:\n{response}\n\n"
        f"Score the reply on {dimension['name']} from 1 to 5. Answer with one digit."
    )


def _digit_ids(models: Models) -> list[int]:
    ids = [models.tokenizer(d, add_special_tokens=False)["input_ids"] for d in SCORE_DIGITS]
    if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != len(ids):
        raise ValueError("the tokenizer does not encode the digits 1-5 as single tokens")
    return [i[0] for i in ids]


def judge_offline(models: Models, *, rubric: dict | list, prompt: str, response: str) -> dict:
    """{dimension key: 1-5} from the base model's next-token log-probabilities of the digits."""
    import torch

    dimensions = rubric if isinstance(rubric, list) else rubric["dimensions"]
    digit_ids = _digit_ids(models)
    rows = [
        models.tokenizer(
            models.renderer.render(
                [{"role": "user", "content": judge_prompt(d, prompt, response)}],
                add_generation_prompt=True,
            ),
            add_special_tokens=False,
        )["input_ids"]
        for d in dimensions
    ]
    ids, mask = _padded(models, rows, "left")
    with adapter(models, False), torch.inference_mode():
        logits = models.model(
            input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1
        ).logits
    last = logits[:, -1, :].float()[:, digit_ids]
    return {d["key"]: int(last[i].argmax().item()) + 1 for i, d in enumerate(dimensions)}


# --- The judge through the model gateway (any registered chat model) --------------------------


def _dimension_key(dimension: dict) -> str:
    return dimension.get("key") or dimension["name"]


def judge_messages(*, dimensions: list[dict], prompt: str, response: str) -> list[dict]:
    """The chat asking a judge model for 1-5 scores on every criterion, as one JSON object."""
    lines = []
    for dim in dimensions:
        anchors = dim.get("anchors") or {}
        anchor_text = "; ".join(f"{k} = {v}" for k, v in sorted(anchors.items()))
        lines.append(
            f"- {_dimension_key(dim)} ({dim.get('name', _dimension_key(dim))}): "
            f"{dim.get('description', '')}" + (f" ({anchor_text})" if anchor_text else "")
        )
    names = ", ".join(f'"{_dimension_key(d)}"' for d in dimensions)
    system = (
        "You are a strict evaluator of a financial advisor's replies. Score the reply on each "
        "criterion from 1 (poor) to 5 (excellent). Answer with one JSON object and nothing else, "
        f"with the integer keys {names}."
    )
    user = (
        "Criteria:\n"
        + "\n".join(lines)
        + f"\n\nClient message:\n{prompt}\n\nAdvisor reply:\n{response}\n\nJSON scores:"
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


class JudgeAnswerError(ValueError):
    """The judge model answered, but not with usable scores (permanent: retrying the same
    request at temperature 0 gives the same answer)."""


def parse_scores(text: str, names: list[str]) -> dict[str, int]:
    """The first JSON object in ``text`` with an integer 1-5 for every name."""
    import json
    import re

    match = re.search(r"\{.*?\}", text, flags=re.DOTALL)
    if not match:
        raise JudgeAnswerError(f"The judge did not answer with JSON scores: {text[:200]!r}")
    try:
        data = json.loads(match.group(0))
        scores = {name: int(data[name]) for name in names}
    except (ValueError, KeyError, TypeError) as exc:
        raise JudgeAnswerError(
            f"The judge's scores are incomplete or not integers: {match.group(0)[:200]!r}"
        ) from exc
    bad = {k: v for k, v in scores.items() if not 1 <= v <= 5}
    if bad:
        raise JudgeAnswerError(f"The judge gave scores outside 1-5: {bad}")
    return scores


JUDGE_MAX_TOKENS = 200


def judge_with_gateway(
    *, model: str, dimensions: list[dict], prompt: str, response: str, caller
) -> tuple[dict[str, int], dict]:
    """(scores, raw) from a registered chat model, one ``jobs.gateway.chat`` call at
    temperature 0 (retries, breaker, rate limits, cache, budget and the ledger row with the
    caller's feature and subject are the gateway's). Gateway errors propagate typed."""
    from jobs import gateway

    result = gateway.chat(
        model=model,
        request={
            "messages": judge_messages(dimensions=dimensions, prompt=prompt, response=response),
            "max_tokens": JUDGE_MAX_TOKENS,
            "temperature": 0,
        },
        caller=caller,
        interactive=False,  # a background run waits for the rate limit instead of failing
    )
    scores = parse_scores(result.text, [_dimension_key(d) for d in dimensions])
    meta = result.meta
    raw = {
        "text": result.text[:2000],
        "model": model,
        "tokens": meta.prompt_tokens + meta.completion_tokens,
        "cost": str(meta.cost),
        "cached": meta.cached,
        "request_id": meta.request_id,
    }
    return scores, raw


__all__ = [
    "IGNORE",
    "METHODS",
    "DocNLL",
    "Generation",
    "Models",
    "adapter",
    "document_nll",
    "generate",
    "judge_messages",
    "judge_offline",
    "judge_with_gateway",
    "load_models",
    "mcq_correct",
    "option_logliks",
    "parse_scores",
]
