"""A realistic report context built from the real statistics functions on seeded data."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from evaluation import stats
from evaluation.suites import load_suite


def realistic_context(*, ratings: bool = True, seed: int = 7) -> dict:
    rng = random.Random(seed)
    base_docs = []
    trained_docs = []
    for _ in range(48):
        tokens = rng.randint(120, 420)
        base_nll = tokens * rng.uniform(3.0, 3.4)
        base_docs.append({"nll_sum": base_nll, "tokens": tokens})
        trained_docs.append(
            {"nll_sum": base_nll - tokens * rng.uniform(0.28, 0.46), "tokens": tokens}
        )
    kr = load_suite("knowledge_retention")
    base_correct = [rng.random() < 0.86 for _ in kr.items]
    trained_correct = [c if rng.random() < 0.95 else not c for c in base_correct]
    ei_suite = load_suite("emotional_intelligence")
    bv_suite = load_suite("brand_voice")
    metrics: dict = {
        "perplexity": stats.perplexity_improvement(base_docs, trained_docs, n_boot=500, seed=1),
        "retention": stats.retention(
            base_correct,
            trained_correct,
            categories=[q["category"] for q in kr.items],
            n_boot=500,
            seed=1,
        ),
        "emotional_intelligence": None,
        "brand_voice": None,
        "generation_health": {
            "baseline": stats.generation_health([rng.random() < 0.62 for _ in range(80)]),
            "trained": stats.generation_health([rng.random() < 0.93 for _ in range(80)]),
            "max_new_tokens": 256,
        },
    }
    examples_in = []
    dims = [d["key"] for d in ei_suite.rubric["dimensions"]]
    if ratings:
        base_scores, trained_scores, per_dim = [], [], {d: ([], []) for d in dims}
        for _ in ei_suite.items:
            b = {d: rng.choice([2, 3, 3, 4]) for d in dims}
            t = {d: min(5, b[d] + rng.choice([0, 1, 1, 2])) for d in dims}
            for d in dims:
                per_dim[d][0].append(b[d])
                per_dim[d][1].append(t[d])
            base_scores.append(b)
            trained_scores.append(t)
        ei = stats.rubric_improvement(
            stats.item_means(base_scores), stats.item_means(trained_scores), n_boot=500, seed=1
        )
        ei["source"] = "human+judge"
        # the shape evaluation/services.py stores
        ei["per_dimension"] = {
            d: {
                "name": d.capitalize(),
                "baseline": sum(v[0]) / len(v[0]),
                "trained": sum(v[1]) / len(v[1]),
                "n": len(v[0]),
            }
            for d, v in per_dim.items()
        }
        human = [float(stats.item_means([t])[0]) for t in trained_scores][:40]
        judge = [min(5, max(1, round(h + rng.choice([-1, 0, 0, 0, 1])))) for h in human]
        ei["agreement"] = stats.krippendorff_alpha(
            [[round(h) for h in human], judge], n_boot=300, seed=1
        )
        metrics["emotional_intelligence"] = ei
        keys = [c["key"] for c in bv_suite.rubric["dimensions"]]
        bv_scores = [
            {
                k: min(
                    5,
                    max(
                        1, rng.choice([4, 4, 5, 5, 4, 3]) - (k == "directness") * rng.choice([0, 1])
                    ),
                )
                for k in keys
            }
            for _ in bv_suite.items
        ]
        bv_scores[4]["optimism"] = 2
        brand = stats.brand_consistency(bv_scores, n_boot=500, seed=1)
        names = {c["key"]: c["name"] for c in bv_suite.rubric["dimensions"]}
        for key, row in brand["per_characteristic"].items():
            row["name"] = names[key]
            row["baseline_mean"] = round(row["mean"] - 0.8, 2)
        for flag in brand["flagged"]:
            flag["item_id"] = bv_suite.items[flag["index"]]["id"]
        brand["baseline"] = {"consistency_pct": 66.0, "mean_score": 3.3, "n_responses": 30}
        metrics["brand_voice"] = brand
        deltas = [
            stats.item_means([t])[0] - stats.item_means([b])[0]
            for b, t in zip(base_scores, trained_scores, strict=True)
        ]
    else:
        deltas = [None] * len(ei_suite.items)
    for item, delta in zip(ei_suite.items, deltas, strict=True):
        examples_in.append(
            {
                "id": item["id"],
                "category": item["category"],
                "suite": "emotional_intelligence",
                "prompt": item["prompt"],
                "baseline": "It is important to review your finances. You should create a budget and "
                "consult a financial professional for advice tailored to your situation.",
                "trained": "I can hear how heavy this feels, and it makes sense that you're worried. "
                "Let's take it one step at a time. 1) List what you owe and when it is due. "
                "2) Call the lender before the due date; many offer hardship plans. "
                "What feels most urgent to you right now?",
                "score_delta": delta,
            }
        )
    return {
        "title": "Validation report: Elena Morales financial advisor",
        "generated_at": datetime(2026, 11, 30, 15, 40, tzinfo=UTC),
        "job": {
            "id": "4f1c2a9e-6b7d-4e0a-9c51-2d8f7b3a1e66",
            "name": "Elena advisor v1",
            "base_model": "SmolLM2-135M-Instruct",
            "preset": "Balanced",
            "configuration": {
                "learning_rate": 0.0002,
                "epochs": 3,
                "lora_r": 16,
                "lora_alpha": 32,
                "max_seq_length": 1024,
                "micro_batch_size": 4,
            },
        },
        "run": {
            "id": "9b0e7c1d-2a44-4f3b-8d6e-5c1a0f9e8b27",
            "evaluator_version": "1.0.0",
            "suites": {
                n: s.version
                for n, s in [
                    ("knowledge_retention", kr),
                    ("emotional_intelligence", ei_suite),
                    ("brand_voice", bv_suite),
                ]
            },
            "suite_hashes": {"knowledge_retention": kr.sha256},
            "decoding": {"temperature": 0.0, "max_new_tokens": 256, "batch_size": 8},
            "seeds": {"generation": 1234, "bootstrap": 1, "examples": 0},
            "started_at": datetime(2026, 11, 30, 15, 2, tzinfo=UTC),
            "completed_at": datetime(2026, 11, 30, 15, 31, tzinfo=UTC),
        },
        "metrics": metrics,
        "examples": stats.select_examples(examples_in, k=10, seed=0),
        "approval": {
            "status": "approved",
            "by": "maria.chen",
            "at": datetime(2026, 11, 30, 16, 5, tzinfo=UTC),
            "reason": "All targets met; empathy gains visible in the grief and shame scenarios.",
        }
        if ratings
        else None,
    }
