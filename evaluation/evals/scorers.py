"""Scoring one answer with a rubric: correctness against the reference (exact match, token F1,
embedding similarity through ``jobs.gateway.embed``), faithfulness and hallucination from the
answer's claims (sentences) checked against the contexts and the reference, and an LLM judge
through ``jobs.gateway.chat`` for the dimensions a rubric gives to one. The judge's answer is
parsed with evaluation/scoring.py's ``parse_scores`` (the validation runs' judge parser).

Exact match and token F1 follow the SQuAD evaluation script's normalisation (lower case, no
punctuation, no articles, single spaces) — a dozen lines, so written here rather than adding a
dependency (``evaluate``'s squad metric pulls datasets/pyarrow for the same 12 lines).
Claim support is lexical: a claim is supported by a passage when at least ``support_threshold``
of its content words appear in it. Deterministic, cheap, and explainable on the page.
"""

from __future__ import annotations

import collections
import math
import re
import string
from dataclasses import dataclass, field
from typing import Any

from evaluation.evals.rubrics import Rubric

REFUSAL = re.compile(
    r"\b(i\s*(?:can(?:no|')t|cannot|won't|will not|am unable|'m unable|am not able)|"
    r"as an ai\b|i'm sorry|i am sorry|unable to (?:help|grade|comply))",
    re.IGNORECASE,
)
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "to",
        "in",
        "on",
        "at",
        "by",
        "for",
        "with",
        "and",
        "or",
        "but",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "as",
        "from",
        "into",
        "than",
        "then",
        "so",
        "such",
        "not",
        "no",
        "do",
        "does",
        "did",
        "has",
        "have",
        "had",
        "he",
        "she",
        "they",
        "we",
        "you",
        "i",
        "his",
        "her",
        "their",
        "our",
        "your",
        "them",
        "him",
        "me",
        "my",
    ]
)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def normalize(text: str) -> str:
    text = (text or "").lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return 0.0 if na == 0 or nb == 0 else dot / (na * nb)


def claims(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text or "") if len(content_words(s)) > 0]


def content_words(text: str) -> list[str]:
    return [w for w in normalize(text).split() if w not in STOPWORDS]


def support(claim: str, passages: list[str]) -> float:
    """The best share of the claim's content words found in one passage."""
    words = set(content_words(claim))
    if not words:
        return 1.0
    best = 0.0
    for passage in passages:
        found = words & set(content_words(passage))
        best = max(best, len(found) / len(words))
    return best


class JudgeRefused(Exception):
    pass


class JudgeInvalid(Exception):
    pass


@dataclass
class Scored:
    scores: dict[str, dict] = field(default_factory=dict)
    passed: bool | None = None
    judge: dict = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Any = 0


def _normalised(value: float, scale: dict) -> float:
    lo, hi = float(scale["min"]), float(scale["max"])
    return max(0.0, min(1.0, (value - lo) / (hi - lo)))


def _passes(dim: dict, value: float) -> bool:
    threshold = float(dim["pass_threshold"])
    return value >= threshold if dim.get("higher_is_better", True) else value <= threshold


def judge_messages(rubric: Rubric, *, input: str, output: str, contexts: list[str]) -> list[dict]:
    judge = rubric.judge or {}
    ctx = "\n".join(f"[{i + 1}] {c}" for i, c in enumerate(contexts)) or "(none)"
    return [
        {"role": "system", "content": judge["system"]},
        {
            "role": "user",
            "content": judge["user"]
            .replace("{contexts}", ctx)
            .replace("{input}", input)
            .replace("{output}", output),
        },
    ]


def _judge(rubric, dim, *, input, output, contexts, judge_model, caller, scored) -> float:
    from evaluation.scoring import JudgeAnswerError, parse_scores
    from jobs import gateway

    messages = judge_messages(rubric, input=input, output=output, contexts=contexts)
    scored.judge = {
        "model": judge_model,
        "rubric": rubric.label,
        "rubric_sha256": rubric.sha256,
        "prompt": messages,
    }
    result = gateway.chat(
        model=judge_model,
        request={
            "messages": messages,
            "max_tokens": int((rubric.judge or {}).get("max_tokens", 64)),
            "temperature": 0,
        },
        caller=caller,
        interactive=False,
    )
    meta = result.meta
    scored.prompt_tokens += meta.prompt_tokens
    scored.completion_tokens += meta.completion_tokens
    scored.cost += meta.cost
    text = result.text or ""
    scored.judge.update(
        {"answer": text[:2000], "request_id": meta.request_id, "cached": meta.cached}
    )
    try:
        grade = parse_scores(text, ["score"])["score"]
    except JudgeAnswerError as exc:
        if REFUSAL.search(text):
            error: Exception = JudgeRefused(f"The judge refused to grade: {text[:200]!r}")
        else:
            error = JudgeInvalid(str(exc))
        error.judge = scored.judge  # the prompt, model and answer stay on the stored run
        raise error from exc
    return _normalised(grade, dim["scale"])


def score(
    rubric: Rubric,
    *,
    input: str,
    output: str,
    reference: str = "",
    contexts: list[str] | None = None,
    embed_model: str | None = None,
    judge_model: str | None = None,
    caller=None,
) -> Scored:
    """Every dimension of ``rubric`` for one answer. A dimension that needs what the sample
    lacks (a reference, contexts) is reported as not applicable and does not decide the pass.
    Gateway errors propagate (the caller classifies them); a judge that refuses or answers
    without a usable grade raises JudgeRefused/JudgeInvalid."""
    from jobs import gateway

    contexts = list(contexts or [])
    scored = Scored()
    sentences = claims(output)
    for dim in rubric.dimensions:
        key, method = dim["key"], dim["method"]
        entry: dict[str, Any] = {"title": dim.get("title", key), "method": method}
        value: float | None = None
        if method == "reference":
            if not reference:
                entry["not_applicable"] = "the sample has no reference answer"
            else:
                measures = {}
                wanted = dim.get("measures", ["exact_match", "token_f1"])
                if "exact_match" in wanted:
                    measures["exact_match"] = exact_match(output, reference)
                if "token_f1" in wanted:
                    measures["token_f1"] = round(token_f1(output, reference), 4)
                if "embedding_similarity" in wanted and embed_model and output.strip():
                    try:
                        result = gateway.embed(
                            model=embed_model,
                            input=[output, reference],
                            caller=caller,
                            interactive=False,
                        )
                    except gateway.GatewayError as exc:
                        # The lexical measures still decide; the page says why this one is
                        # missing.
                        entry["measure_errors"] = {"embedding_similarity": exc.message[:300]}
                    else:
                        a, b = result.embeddings
                        measures["embedding_similarity"] = round(max(0.0, cosine(a, b)), 4)
                        scored.prompt_tokens += result.meta.prompt_tokens
                        scored.cost += result.meta.cost
                        entry["embed_model"] = embed_model
                entry["measures"] = measures
                value = max(measures.values())
        elif method in ("claims_in_contexts", "claims_unsupported"):
            threshold = float(dim.get("support_threshold", 0.6))
            with_reference = method == "claims_unsupported" and reference
            passages = contexts + ([reference] if with_reference else [])
            if method == "claims_in_contexts" and not contexts:
                entry["not_applicable"] = "the sample has no contexts"
            elif not sentences:
                entry["claims"] = []
                value = 1.0 if method == "claims_in_contexts" else 0.0
            elif not passages:
                entry["not_applicable"] = "the sample has neither contexts nor a reference"
            else:
                checked = [
                    {"claim": c[:300], "support": round(support(c, passages), 3)} for c in sentences
                ]
                supported = sum(1 for c in checked if c["support"] >= threshold)
                entry["claims"] = checked
                value = (
                    supported / len(checked)
                    if method == "claims_in_contexts"
                    else (len(checked) - supported) / len(checked)
                )
        elif method == "judge":
            model = judge_model or (rubric.judge or {}).get("default_model")
            value = _judge(
                rubric,
                dim,
                input=input,
                output=output,
                contexts=contexts,
                judge_model=model,
                caller=caller,
                scored=scored,
            )
        if value is not None:
            entry["value"] = round(float(value), 4)
            entry["pass_threshold"] = dim["pass_threshold"]
            entry["higher_is_better"] = dim.get("higher_is_better", True)
            entry["passed"] = _passes(dim, value)
        scored.scores[key] = entry
    decided = [e["passed"] for e in scored.scores.values() if "passed" in e]
    scored.passed = all(decided) if decided else None
    return scored
