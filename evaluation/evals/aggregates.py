"""Dataset-level aggregates of a batch evaluation, per model and overall: pass rate with a
Wilson 95% interval (evaluation/stats.py's ``generation_health``, the validation runs'
proportion helper), dimension means with a bootstrap 95% interval (stats' ``_bootstrap_ci``),
score distributions, the failure taxonomy, latency percentiles, tokens and cost; and the
comparison of each model with the first: the pass-rate difference with Newcombe's hybrid
Wilson interval, and the paired (per sample) bootstrap interval of the mean-score difference.
"""

from __future__ import annotations

import math
from collections import defaultdict
from decimal import Decimal

import numpy as np

from evaluation import stats
from evaluation.models import BatchEval, EvalRun

FAILURES = [c for c, _ in EvalRun.Failure.choices if c]
N_BOOT = 1000
BINS = 10
FIELDS = (
    "pk",
    "model_key",
    "sample_index",
    "run",
    "status",
    "passed",
    "failure",
    "scores",
    "latency_ms",
    "prompt_tokens",
    "completion_tokens",
    "cost",
)


def wilson(flags: list[bool]) -> dict:
    data = stats.generation_health(flags)
    return {
        "rate": data["stop_rate"],
        "k": data["stopped"],
        "n": data["n"],
        "ci_low": data["ci_low"],
        "ci_high": data["ci_high"],
        "ci_method": "Wilson score interval (95%)" if data["n"] else None,
    }


def _mean_ci(values: list[float], seed: int) -> dict:
    if not values:
        return {"mean": None, "n": 0, "ci_low": None, "ci_high": None}
    arr = np.asarray(values, dtype=float)
    low, high, method = stats._bootstrap_ci(
        (arr,), lambda x, axis=-1: np.mean(x, axis=axis), n_boot=N_BOOT, seed=seed
    )
    return {
        "mean": round(float(arr.mean()), 4),
        "n": len(values),
        "ci_low": stats._r(low),
        "ci_high": stats._r(high),
        "ci_method": f"bootstrap ({method}, 95%)" if method else None,
    }


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "n": 0}
    arr = np.asarray(values, dtype=float)
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {"p50": round(p50, 1), "p95": round(p95, 1), "p99": round(p99, 1), "n": len(values)}


def _histogram(values: list[float]) -> list[dict]:
    counts, edges = np.histogram(values, bins=BINS, range=(0.0, 1.0))
    return [
        {"low": round(float(edges[i]), 2), "high": round(float(edges[i + 1]), 2), "count": int(c)}
        for i, c in enumerate(counts)
    ]


def _summary(rows: list[dict], dimensions: list[str], seed: int) -> dict:
    done = [r for r in rows if r["status"] in (EvalRun.Status.SUCCEEDED, EvalRun.Status.FAILED)]
    decided = [r for r in done if r["passed"] is not None]
    dims = {}
    for i, key in enumerate(dimensions):
        values = [
            r["scores"][key]["value"]
            for r in done
            if isinstance(r["scores"].get(key), dict) and "value" in r["scores"][key]
        ]
        dims[key] = {**_mean_ci(values, seed + i), "histogram": _histogram(values)}
    taxonomy = {f: 0 for f in FAILURES}
    for r in done:
        if r["failure"]:
            taxonomy[r["failure"]] += 1
    return {
        "items": len(rows),
        "done": len(done),
        "succeeded": sum(1 for r in done if r["status"] == EvalRun.Status.SUCCEEDED),
        "failed": sum(1 for r in done if r["status"] == EvalRun.Status.FAILED),
        "cancelled": sum(1 for r in rows if r["status"] == EvalRun.Status.CANCELLED),
        "pass_rate": wilson([bool(r["passed"]) for r in decided]),
        "dimensions": dims,
        "failures": taxonomy,
        "latency_ms": percentiles([r["latency_ms"] for r in done if r["latency_ms"] is not None]),
        "tokens": {
            "prompt": sum(r["prompt_tokens"] for r in rows),
            "completion": sum(r["completion_tokens"] for r in rows),
        },
        "cost": str(sum((Decimal(r["cost"]) for r in rows), Decimal(0))),
    }


def newcombe(a: dict, b: dict) -> dict:
    """Difference of two proportions (b - a) with Newcombe's hybrid score interval (method
    10), built from the two Wilson intervals."""
    if not a["n"] or not b["n"]:
        return {"difference": None, "ci_low": None, "ci_high": None}
    p1, l1, u1 = a["rate"], a["ci_low"], a["ci_high"]
    p2, l2, u2 = b["rate"], b["ci_low"], b["ci_high"]
    d = p2 - p1
    low = d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2)
    high = d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
    return {
        "difference": round(d, 4),
        "ci_low": round(low, 4),
        "ci_high": round(high, 4),
        "ci_method": "Newcombe hybrid score interval (95%)",
    }


def _paired_difference(rows_a, rows_b, key: str, seed: int) -> dict:
    def per_sample(rows):
        out = defaultdict(list)
        for r in rows:
            entry = r["scores"].get(key)
            if isinstance(entry, dict) and "value" in entry:
                out[r["sample_index"]].append(entry["value"])
        return {k: float(np.mean(v)) for k, v in out.items()}

    a, b = per_sample(rows_a), per_sample(rows_b)
    common = sorted(set(a) & set(b))
    if not common:
        return {"difference": None, "n": 0, "ci_low": None, "ci_high": None}
    x = np.asarray([a[k] for k in common])
    y = np.asarray([b[k] for k in common])
    low, high, method = stats._bootstrap_ci(
        (x, y),
        lambda u, v, axis=-1: np.mean(v, axis=axis) - np.mean(u, axis=axis),
        n_boot=N_BOOT,
        seed=seed,
    )
    return {
        "difference": round(float(y.mean() - x.mean()), 4),
        "n": len(common),
        "ci_low": stats._r(low),
        "ci_high": stats._r(high),
        "ci_method": f"paired bootstrap over samples ({method}, 95%)" if method else None,
    }


def aggregates(batch: BatchEval) -> dict:
    from evaluation.evals.rubrics import rubric_get

    rows = list(batch.items.values(*FIELDS))
    for r in rows:
        r["cost"] = str(r["cost"])
    try:
        dimensions = [d["key"] for d in rubric_get(batch.rubric).dimensions]
    except ValueError:
        dimensions = sorted({k for r in rows for k in (r["scores"] or {})})
    seed = int(str(batch.pk).replace("-", "")[:8], 16)
    by_model = defaultdict(list)
    for r in rows:
        by_model[r["model_key"]].append(r)
    models = {m: _summary(by_model.get(m, []), dimensions, seed) for m in batch.models_list}
    comparisons = []
    first = batch.models_list[0] if batch.models_list else None
    for other in batch.models_list[1:]:
        comparisons.append(
            {
                "baseline": first,
                "model": other,
                "pass_rate": newcombe(models[first]["pass_rate"], models[other]["pass_rate"]),
                "dimensions": {
                    key: _paired_difference(by_model[first], by_model[other], key, seed + 97)
                    for key in dimensions
                },
            }
        )
    done = sum(1 for r in rows if r["status"] not in EvalRun.OPEN)
    return {
        "progress": {
            "done": done,
            "total": len(rows),
            "percent": round(100 * done / len(rows), 1) if rows else 100.0,
        },
        "overall": _summary(rows, dimensions, seed),
        "models": models,
        "comparisons": comparisons,
        "final": not any(r["status"] in EvalRun.OPEN for r in rows),
    }
