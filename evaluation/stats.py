"""Statistics of a validation run: every figure comes with its 95% interval and is reproducible.

Pure numpy/scipy, no Django. Every resampling takes an explicit ``seed`` and ``n_boot``; the
same inputs and seed give the same numbers.

Intervals
    Paired bootstrap over the natural unit (documents for perplexity, questions for retention,
    items for rubric scores, responses for brand voice, rated units for agreement). Paired means
    one resample picks the same units for the baseline and the trained model, so the interval
    is for the *difference* and not for two independent means. ``scipy.stats.bootstrap`` with
    the bias-corrected and accelerated (BCa) method is used; when BCa is undefined (all units
    identical, so the jackknife has no spread) the percentile interval is reported instead and
    ``ci_method`` says which one was used. Fewer than two units give no interval (``None``).
"""

from __future__ import annotations

import math
import random
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

N_BOOT = 2000
BOOT_BATCH = 256  # resamples (and BCa jackknife rows) per batch: memory O(256 x units)
CONFIDENCE = 0.95
PERPLEXITY_TARGET_PCT = 30.0
RETENTION_THRESHOLD_PCT = 95.0
EI_TARGET_PCT = 40.0
BRAND_TARGET_PCT = 85.0
BRAND_FLAG_BELOW = 3.0
RUBRIC_MAX = 5.0

SELECTION_RULE = (
    "Before/after examples are chosen by rule, never by hand: first the items with the largest "
    "rated improvement (trained minus baseline mean rating), then the largest regressions (so "
    "the report is not one-sided), then items drawn at random with a fixed seed, one category at "
    "a time in turn, until k examples are shown. Without ratings, all examples are the seeded "
    "category-stratified draw."
)


# ------------------------------------------------------------------ helpers


def _nll_tokens(doc: Any) -> tuple[float, int]:
    if isinstance(doc, dict):
        return float(doc["nll_sum"]), int(doc["tokens"])
    return float(doc.nll_sum), int(doc.tokens)


def _r(value: float | None, digits: int = 4) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def _bootstrap_ci(
    data: tuple[np.ndarray, ...],
    statistic: Callable[..., np.ndarray],
    *,
    n_boot: int,
    seed: int,
) -> tuple[float | None, float | None, str | None]:
    """Paired BCa bootstrap interval (percentile where BCa is undefined); None below 2 units."""
    from scipy.stats import bootstrap

    n = len(data[0])
    if n < 2:
        return None, None, None
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # degenerate resamples: handled by the fallback
            with np.errstate(all="ignore"):
                result = bootstrap(
                    data,
                    statistic,
                    paired=True,
                    vectorized=True,
                    n_resamples=n_boot,
                    confidence_level=CONFIDENCE,
                    method=method,
                    batch=BOOT_BATCH,
                    rng=np.random.default_rng(seed),
                )
        low, high = result.confidence_interval
        if math.isfinite(low) and math.isfinite(high):
            return float(low), float(high), method
    return None, None, None


def _ci_fields(low, high, method, n_boot, seed, digits=4) -> dict:
    return {
        "ci_low": _r(low, digits),
        "ci_high": _r(high, digits),
        "ci_level": CONFIDENCE,
        "ci_method": f"paired bootstrap ({method})" if method else None,
        "n_boot": n_boot,
        "seed": seed,
    }


# ------------------------------------------------------------------ perplexity


def _ppl_improvement(b_nll, b_tok, t_nll, t_tok, axis=-1):
    base = np.exp(np.sum(b_nll, axis=axis) / np.sum(b_tok, axis=axis))
    trained = np.exp(np.sum(t_nll, axis=axis) / np.sum(t_tok, axis=axis))
    return (base - trained) / base * 100.0


def perplexity_improvement(
    base: Sequence[Any],
    trained: Sequence[Any],
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    target_pct: float = PERPLEXITY_TARGET_PCT,
) -> dict:
    """Corpus perplexity (exp of summed NLL over summed tokens) of baseline and trained, and the
    improvement ((baseline - trained) / baseline * 100) with a paired bootstrap interval over
    documents (each resample recomputes both corpus perplexities from the summed NLL/tokens).

    ``base``/``trained``: one DocNLL (or dict with nll_sum, tokens) per document, same order.
    """
    if len(base) != len(trained):
        raise ValueError("baseline and trained need one NLL entry per document, in the same order")
    b = np.array([_nll_tokens(d) for d in base], dtype=float).reshape(-1, 2)
    t = np.array([_nll_tokens(d) for d in trained], dtype=float).reshape(-1, 2)
    if len(b) == 0 or b[:, 1].sum() == 0:
        raise ValueError("perplexity needs at least one document with scored tokens")
    if not np.array_equal(b[:, 1], t[:, 1]):
        raise ValueError("baseline and trained must be scored on the same tokens per document")
    baseline = math.exp(b[:, 0].sum() / b[:, 1].sum())
    trained_ppl = math.exp(t[:, 0].sum() / t[:, 1].sum())
    improvement = (baseline - trained_ppl) / baseline * 100.0
    low, high, method = _bootstrap_ci(
        (b[:, 0], b[:, 1], t[:, 0], t[:, 1]), _ppl_improvement, n_boot=n_boot, seed=seed
    )
    return {
        "baseline": _r(baseline),
        "trained": _r(trained_ppl),
        "improvement_pct": _r(improvement, 3),
        **_ci_fields(low, high, method, n_boot, seed, 3),
        "n_documents": len(b),
        "n_tokens": int(b[:, 1].sum()),
        "target_pct": target_pct,
        "passed": improvement >= target_pct,
    }


# ------------------------------------------------------------------ knowledge retention


def _retention_stat(base, trained, axis=-1):
    return np.mean(trained, axis=axis) / np.mean(base, axis=axis) * 100.0


def retention(
    base_correct: Sequence[bool],
    trained_correct: Sequence[bool],
    *,
    categories: Sequence[str] | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
    threshold_pct: float = RETENTION_THRESHOLD_PCT,
) -> dict:
    """Retention = trained accuracy / baseline accuracy * 100, with a paired bootstrap interval
    over questions; ``alert`` when the point estimate is below ``threshold_pct``.

    ``by_category``: per category the two accuracies and the retention (point estimates; with 25
    questions a category's interval would be too wide to read).
    """
    if len(base_correct) != len(trained_correct):
        raise ValueError("baseline and trained need one result per question, in the same order")
    if categories is not None and len(categories) != len(base_correct):
        raise ValueError("categories needs one entry per question")
    if not base_correct:
        raise ValueError("retention needs at least one question")
    b = np.array(base_correct, dtype=float)
    t = np.array(trained_correct, dtype=float)
    base_acc, trained_acc = float(b.mean()), float(t.mean())
    if base_acc > 0:
        value = trained_acc / base_acc * 100.0
        low, high, method = _bootstrap_ci((b, t), _retention_stat, n_boot=n_boot, seed=seed)
    else:  # a baseline that answers nothing right leaves nothing to retain
        value, low, high, method = None, None, None, None
    by_category: dict[str, dict] = {}
    if categories is not None:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, category in enumerate(categories):
            groups[category].append(i)
        for category in sorted(groups):
            idx = groups[category]
            cb, ct = float(b[idx].mean()), float(t[idx].mean())
            by_category[category] = {
                "n": len(idx),
                "baseline_accuracy": _r(cb),
                "trained_accuracy": _r(ct),
                "retention_pct": _r(ct / cb * 100.0, 3) if cb > 0 else None,
            }
    return {
        "baseline_accuracy": _r(base_acc),
        "trained_accuracy": _r(trained_acc),
        "retention_pct": _r(value, 3),
        **_ci_fields(low, high, method, n_boot, seed, 3),
        "n_questions": len(b),
        "threshold_pct": threshold_pct,
        "alert": value is not None and value < threshold_pct,
        "by_category": by_category,
    }


# ------------------------------------------------------------------ rubric scores


def _rubric_stat(base, trained, axis=-1):
    b = np.mean(base, axis=axis)
    return (np.mean(trained, axis=axis) - b) / b * 100.0


def rubric_improvement(
    base_scores: Sequence[float | None],
    trained_scores: Sequence[float | None],
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    target_pct: float = EI_TARGET_PCT,
) -> dict:
    """Mean rubric score (1-5) of baseline and trained and the improvement
    ((trained - baseline) / baseline * 100), paired by item with a bootstrap interval over items.

    Each entry is one item's score already averaged over its raters and rubric dimensions (see
    ``item_means``). Items missing either side (None) are left out; ``n`` counts the pairs used.
    """
    if len(base_scores) != len(trained_scores):
        raise ValueError("baseline and trained need one score per item, in the same order")
    pairs = [
        (float(b), float(t))
        for b, t in zip(base_scores, trained_scores, strict=True)
        if b is not None and t is not None
    ]
    if not pairs:
        return {
            "baseline_mean": None,
            "trained_mean": None,
            "improvement_pct": None,
            **_ci_fields(None, None, None, n_boot, seed),
            "n": 0,
            "target_pct": target_pct,
            "passed": None,
        }
    b = np.array([p[0] for p in pairs])
    t = np.array([p[1] for p in pairs])
    improvement = _rubric_stat(b, t)
    low, high, method = _bootstrap_ci((b, t), _rubric_stat, n_boot=n_boot, seed=seed)
    return {
        "baseline_mean": _r(b.mean()),
        "trained_mean": _r(t.mean()),
        "improvement_pct": _r(improvement, 3),
        **_ci_fields(low, high, method, n_boot, seed, 3),
        "n": len(pairs),
        "target_pct": target_pct,
        "passed": bool(improvement >= target_pct),
    }


def item_means(scores: Sequence[dict[str, float] | Sequence[dict[str, float]]]) -> list[float]:
    """One number per item: the mean over its raters' dimension scores.

    ``scores[i]`` is either one {dimension: score} dict or a list of them (one per rater).
    Items without any score give None.
    """
    out: list[float] = []
    for item in scores:
        raters = [item] if isinstance(item, dict) else list(item)
        values = [float(v) for r in raters for v in r.values() if v is not None]
        out.append(float(np.mean(values)) if values else None)
    return out


# ------------------------------------------------------------------ agreement


def krippendorff_alpha(
    reliability_data: Sequence[Sequence[float | None]],
    *,
    level: str = "ordinal",
    n_boot: int = N_BOOT,
    seed: int = 0,
    value_domain: Sequence[float] | None = (1, 2, 3, 4, 5),
) -> dict:
    """Krippendorff's alpha (``krippendorff`` package) for raters x units (None = not rated),
    with a percentile bootstrap interval over units.

    Only units rated by at least two raters carry information and are kept. The bootstrap loop is
    written here rather than with ``scipy.stats.bootstrap`` because alpha is undefined (0/0) in
    resamples where every rating is the same value; those resamples are skipped (counted in
    ``n_boot_undefined``) instead of turning the whole interval into NaN.
    """
    import krippendorff

    matrix = np.array(
        [[np.nan if v is None else float(v) for v in row] for row in reliability_data],
        dtype=float,
    )
    if matrix.ndim != 2 or matrix.shape[0] < 2:
        raise ValueError("agreement needs a raters x units table with at least two raters")
    pairable = (~np.isnan(matrix)).sum(axis=0) >= 2
    matrix = matrix[:, pairable]
    n_units = int(matrix.shape[1])
    n_raters = int((~np.isnan(matrix)).any(axis=1).sum())
    domain = (
        np.array(sorted(value_domain), dtype=float)
        if value_domain is not None
        else np.unique(matrix[~np.isnan(matrix)])
    )
    if value_domain is not None:
        observed = np.unique(matrix[~np.isnan(matrix)])
        if not np.isin(observed, domain).all():
            raise ValueError(f"ratings outside the value domain {list(domain)}")

    def alpha_of(m: np.ndarray) -> float:
        try:
            with np.errstate(all="ignore"):
                return float(
                    krippendorff.alpha(
                        reliability_data=m, level_of_measurement=level, value_domain=domain
                    )
                )
        except (ValueError, ZeroDivisionError):
            return math.nan

    result = {
        "alpha": None,
        "ci_low": None,
        "ci_high": None,
        "ci_level": CONFIDENCE,
        "ci_method": "bootstrap over units (percentile)",
        "level": level,
        "n_units": n_units,
        "n_raters": n_raters,
        "n_boot": n_boot,
        "n_boot_undefined": 0,
        "seed": seed,
    }
    if n_units < 2:
        return result
    result["alpha"] = _r(alpha_of(matrix))
    rng = np.random.default_rng(seed)
    boots = np.array(
        [alpha_of(matrix[:, rng.integers(0, n_units, n_units)]) for _ in range(n_boot)]
    )
    defined = boots[np.isfinite(boots)]
    result["n_boot_undefined"] = int(n_boot - len(defined))
    if len(defined):
        tail = (1 - CONFIDENCE) / 2 * 100
        result["ci_low"] = _r(np.percentile(defined, tail))
        result["ci_high"] = _r(np.percentile(defined, 100 - tail))
    return result


# ------------------------------------------------------------------ brand voice


def brand_consistency(
    scores: Sequence[dict[str, float]],
    *,
    threshold: float = BRAND_FLAG_BELOW,
    target_pct: float = BRAND_TARGET_PCT,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict:
    """Brand voice consistency of the rated responses.

    Definition: consistency % = (mean of every characteristic score of every response, 1-5
    scale) / 5 * 100, so the seed's target of 85% is an average score of 4.25/5. ``scores[i]``
    is response i's {characteristic: score} (already averaged over raters; missing
    characteristics are left out of the mean). A response is flagged when any characteristic
    scores below ``threshold`` (3). The interval is a bootstrap over responses.
    """
    rows = [
        (i, {k: float(v) for k, v in s.items() if v is not None})
        for i, s in enumerate(scores)
        if s and any(v is not None for v in s.values())
    ]
    per_char: dict[str, list[float]] = defaultdict(list)
    for _, row in rows:
        for key, value in row.items():
            per_char[key].append(value)
    flagged = [
        {"index": i, "characteristics": {k: v for k, v in row.items() if v < threshold}}
        for i, row in rows
        if any(v < threshold for v in row.values())
    ]
    all_values = [v for _, row in rows for v in row.values()]
    if not all_values:
        return {
            "consistency_pct": None,
            "mean_score": None,
            **_ci_fields(None, None, None, n_boot, seed),
            "n_responses": 0,
            "target_pct": target_pct,
            "passed": None,
            "threshold": threshold,
            "per_characteristic": {},
            "flagged": [],
        }
    mean_score = float(np.mean(all_values))
    consistency = mean_score / RUBRIC_MAX * 100.0
    # Resampling responses: each response weighs by its number of scores, as in the point value.
    sums = np.array([sum(row.values()) for _, row in rows])
    counts = np.array([len(row) for _, row in rows], dtype=float)
    low, high, method = _bootstrap_ci(
        (sums, counts),
        lambda s, c, axis=-1: np.sum(s, axis=axis) / np.sum(c, axis=axis) / RUBRIC_MAX * 100.0,
        n_boot=n_boot,
        seed=seed,
    )
    return {
        "consistency_pct": _r(consistency, 3),
        "mean_score": _r(mean_score),
        **_ci_fields(low, high, method, n_boot, seed, 3),
        "n_responses": len(rows),
        "target_pct": target_pct,
        "passed": consistency >= target_pct,
        "threshold": threshold,
        "per_characteristic": {
            key: {
                "mean": _r(float(np.mean(values))),
                "pct": _r(float(np.mean(values)) / RUBRIC_MAX * 100.0, 3),
                "n": len(values),
                "below_threshold": sum(1 for v in values if v < threshold),
            }
            for key, values in per_char.items()
        },
        "flagged": flagged,
    }


# ------------------------------------------------------------------ generation health


def generation_health(stopped: Sequence[bool]) -> dict:
    """Share of responses that ended by themselves (end-of-turn/EOS) before the token limit,
    with a Wilson 95% interval."""
    from scipy.stats import binomtest

    n = len(stopped)
    k = int(sum(bool(s) for s in stopped))
    if n == 0:
        return {"stop_rate": None, "stopped": 0, "n": 0, "ci_low": None, "ci_high": None}
    ci = binomtest(k, n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return {
        "stop_rate": _r(k / n),
        "stopped": k,
        "n": n,
        "ci_low": _r(ci.low),
        "ci_high": _r(ci.high),
        "ci_method": "Wilson score interval",
    }


# ------------------------------------------------------------------ examples


def select_examples(pairs: Sequence[dict], *, k: int = 10, seed: int = 0) -> list[dict]:
    """Before/after examples by SELECTION_RULE (never by hand).

    ``pairs``: dicts with at least id, prompt, baseline, trained, and optionally score_delta
    (trained minus baseline mean rating, None when unrated) and category. Up to 60% of k are the
    largest improvements, up to 20% the largest regressions, the rest a seeded draw that takes
    one item per category in turn. Each row gets ``reason``.
    """
    k = min(k, len(pairs))
    chosen: list[dict] = []
    used: set[Any] = set()
    rated = [p for p in pairs if p.get("score_delta") is not None]
    n_best = math.ceil(k * 0.6) if rated else 0
    n_worst = math.floor(k * 0.2) if rated else 0
    best = sorted(
        (p for p in rated if p["score_delta"] > 0), key=lambda p: (-p["score_delta"], str(p["id"]))
    )
    for p in best[:n_best]:
        chosen.append({**p, "reason": f"largest rated improvement ({p['score_delta']:+.2f})"})
        used.add(p["id"])
    worst = sorted(
        (p for p in rated if p["score_delta"] < 0 and p["id"] not in used),
        key=lambda p: (p["score_delta"], str(p["id"])),
    )
    for p in worst[:n_worst]:
        chosen.append({**p, "reason": f"largest rated regression ({p['score_delta']:+.2f})"})
        used.add(p["id"])
    rng = random.Random(seed)
    by_category: dict[str, list[dict]] = defaultdict(list)
    for p in pairs:
        if p["id"] not in used:
            by_category[str(p.get("category") or "general")].append(p)
    for items in by_category.values():
        rng.shuffle(items)
    queues = [by_category[c] for c in sorted(by_category)]
    while len(chosen) < k and any(queues):
        for queue in queues:
            if queue and len(chosen) < k:
                p = queue.pop(0)
                chosen.append({**p, "reason": f"seeded draw (seed {seed}), stratified by category"})
    return chosen


# ------------------------------------------------------------------ display


def display_line(
    name: str,
    before: float | None,
    after: float | None,
    unit: str = "",
    higher_is_better: bool = True,
    *,
    arrow: str = "->",
    digits: int = 1,
) -> str:
    """ "Perplexity: 24.5 -> 16.8 (31% improvement)"; "Emotional Intelligence: 3.2/5 -> 4.5/5
    (41% improvement)". The percentage is relative to ``before``."""
    if before is None or after is None:
        return f"{name}: not available"
    text = f"{name}: {before:.{digits}f}{unit} {arrow} {after:.{digits}f}{unit}"
    if before == 0:
        return text
    change = (after - before) / before * 100.0
    gain = change if higher_is_better else -change
    if round(gain) == 0:
        return f"{text} (no change)"
    word = "improvement" if gain > 0 else "worse"
    return f"{text} ({abs(gain):.0f}% {word})"
