"""Statistics against hand-computed values, the krippendorff package's documented example, and
the properties every interval must have."""

import json
import math

import numpy as np
import pytest

from evaluation import stats
from evaluation.scoring import DocNLL


def _docs(rng, n, shift):
    base, trained = [], []
    for _ in range(n):
        tokens = int(rng.integers(50, 300))
        nll = tokens * rng.uniform(2.8, 3.4)
        base.append(DocNLL(nll, tokens))
        trained.append(DocNLL(nll - tokens * rng.uniform(shift - 0.1, shift + 0.1), tokens))
    return base, trained


def test_perplexity_corpus_values_by_hand():
    base = [DocNLL(10.0, 5), {"nll_sum": 6.0, "tokens": 5}]
    trained = [DocNLL(8.0, 5), DocNLL(4.0, 5)]
    result = stats.perplexity_improvement(base, trained, n_boot=200, seed=0)
    b, t = math.exp(16 / 10), math.exp(12 / 10)
    assert result["baseline"] == pytest.approx(b, abs=1e-4)
    assert result["trained"] == pytest.approx(t, abs=1e-4)
    assert result["improvement_pct"] == pytest.approx((b - t) / b * 100, abs=1e-3)
    assert result["n_documents"] == 2 and result["n_tokens"] == 10
    assert result["target_pct"] == 30 and result["passed"] is True
    json.dumps(result)  # stored as JSON by the run


def test_perplexity_interval_contains_estimate_shrinks_with_n_and_is_seeded():
    rng = np.random.default_rng(3)
    small = stats.perplexity_improvement(*_docs(rng, 12, 0.3), n_boot=600, seed=5)
    large = stats.perplexity_improvement(*_docs(rng, 300, 0.3), n_boot=600, seed=5)
    for r in (small, large):
        assert r["ci_low"] <= r["improvement_pct"] <= r["ci_high"]
    assert (large["ci_high"] - large["ci_low"]) < (small["ci_high"] - small["ci_low"]) / 2
    rng = np.random.default_rng(3)
    again = stats.perplexity_improvement(*_docs(rng, 12, 0.3), n_boot=600, seed=5)
    assert again == small
    other_seed = stats.perplexity_improvement(
        *_docs(np.random.default_rng(3), 12, 0.3), n_boot=600, seed=6
    )
    assert (other_seed["ci_low"], other_seed["ci_high"]) != (small["ci_low"], small["ci_high"])


def test_perplexity_rejects_mismatched_inputs_and_needs_two_documents_for_an_interval():
    with pytest.raises(ValueError, match="same order"):
        stats.perplexity_improvement([DocNLL(1, 1)], [], n_boot=10, seed=0)
    with pytest.raises(ValueError, match="same tokens"):
        stats.perplexity_improvement([DocNLL(1, 1)], [DocNLL(1, 2)], n_boot=10, seed=0)
    one = stats.perplexity_improvement([DocNLL(9, 3)], [DocNLL(6, 3)], n_boot=10, seed=0)
    assert one["ci_low"] is None and one["ci_high"] is None and one["improvement_pct"] > 0


def test_identical_documents_give_a_zero_width_interval():
    base = [DocNLL(30.0, 10)] * 5
    trained = [DocNLL(20.0, 10)] * 5
    result = stats.perplexity_improvement(base, trained, n_boot=100, seed=0)
    assert result["ci_low"] == result["ci_high"] == pytest.approx(result["improvement_pct"])
    assert result["ci_method"].startswith("paired bootstrap")


def test_retention_by_hand_and_alert():
    base = [True] * 8 + [False] * 2  # 80%
    trained = [True] * 7 + [False] * 3  # 70%
    cats = ["taxes", "investing"] * 5
    result = stats.retention(base, trained, categories=cats, n_boot=500, seed=1)
    assert result["baseline_accuracy"] == 0.8 and result["trained_accuracy"] == 0.7
    assert result["retention_pct"] == pytest.approx(87.5)
    assert result["alert"] is True and result["threshold_pct"] == 95
    assert result["ci_low"] <= 87.5 <= result["ci_high"]
    assert result["by_category"]["taxes"]["n"] == 5
    taxes = result["by_category"]["taxes"]
    assert taxes["baseline_accuracy"] == pytest.approx(
        np.mean([b for b, c in zip(base, cats, strict=True) if c == "taxes"])
    )
    ok = stats.retention([True, True, False, True], [True, True, False, True], n_boot=100, seed=1)
    assert ok["retention_pct"] == 100 and ok["alert"] is False
    nothing = stats.retention([False, False], [True, False], n_boot=100, seed=1)
    assert nothing["retention_pct"] is None and nothing["alert"] is False
    json.dumps(result)


def test_rubric_improvement_pairs_items_and_drops_missing():
    base = [3.0, 2.0, None, 3.0]
    trained = [4.5, 3.0, 5.0, None]
    result = stats.rubric_improvement(base, trained, n_boot=500, seed=2, target_pct=40)
    assert result["n"] == 2
    assert result["baseline_mean"] == 2.5 and result["trained_mean"] == 3.75
    assert result["improvement_pct"] == pytest.approx(50.0)
    assert result["passed"] is True
    assert result["ci_low"] <= 50 <= result["ci_high"]
    empty = stats.rubric_improvement([None], [None], n_boot=10, seed=0)
    assert empty["improvement_pct"] is None and empty["passed"] is None


def test_item_means_average_raters_and_dimensions():
    assert stats.item_means(
        [
            {"empathy": 4, "clarity": 2},
            [{"empathy": 5, "clarity": 5}, {"empathy": 3, "clarity": 3}],
            [],
        ]
    ) == [3.0, 4.0, None]


def test_krippendorff_matches_the_package_documented_example():
    # from the docstring of krippendorff.alpha (Krippendorff 2011)
    nan = None
    data = [
        [nan, nan, nan, nan, nan, 3, 4, 1, 2, 1, 1, 3, 3, nan, 3],
        [1, nan, 2, 1, 3, 3, 4, 3, nan, nan, nan, nan, nan, nan, nan],
        [nan, nan, 2, 1, 3, 4, 4, nan, 2, 1, 1, 3, 3, nan, 4],
    ]
    nominal = stats.krippendorff_alpha(data, level="nominal", n_boot=300, seed=0, value_domain=None)
    interval = stats.krippendorff_alpha(
        data, level="interval", n_boot=300, seed=0, value_domain=None
    )
    assert nominal["alpha"] == pytest.approx(0.691358, abs=1e-4)
    assert interval["alpha"] == pytest.approx(0.810845, abs=1e-4)
    assert interval["n_units"] == 12  # units with a single rating cannot be paired
    assert interval["n_raters"] == 3
    assert interval["ci_low"] <= interval["alpha"] <= interval["ci_high"]
    again = stats.krippendorff_alpha(data, level="interval", n_boot=300, seed=0, value_domain=None)
    assert again == interval


def test_krippendorff_perfect_agreement_and_domain_check():
    data = [[1, 2, 3, 4, 5, 2], [1, 2, 3, 4, 5, 2]]
    result = stats.krippendorff_alpha(data, n_boot=200, seed=0)
    assert result["alpha"] == 1.0
    with pytest.raises(ValueError, match="value domain"):
        stats.krippendorff_alpha([[1, 7], [1, 2]], n_boot=10, seed=0)
    few = stats.krippendorff_alpha([[1, None], [2, 3]], n_boot=10, seed=0)
    assert few["alpha"] is None and few["n_units"] == 1


def test_brand_consistency_definition_flags_and_interval():
    scores = [
        {"warmth": 5, "directness": 4},
        {"warmth": 2, "directness": 5},
        {"warmth": 4, "directness": None},
    ]
    result = stats.brand_consistency(scores, n_boot=500, seed=0)
    mean = (5 + 4 + 2 + 5 + 4) / 5
    assert result["mean_score"] == pytest.approx(mean)
    assert result["consistency_pct"] == pytest.approx(mean / 5 * 100)
    assert result["passed"] is False and result["target_pct"] == 85
    assert result["flagged"] == [{"index": 1, "characteristics": {"warmth": 2.0}}]
    assert result["per_characteristic"]["warmth"]["below_threshold"] == 1
    assert result["per_characteristic"]["directness"]["n"] == 2
    assert result["ci_low"] <= result["consistency_pct"] <= result["ci_high"]
    assert stats.brand_consistency([{"a": 4.25}, {"a": 4.25}])["passed"] is True  # 85% exactly
    assert stats.brand_consistency([])["consistency_pct"] is None


def test_generation_health_with_wilson_interval():
    result = stats.generation_health([True, True, False, True])
    assert result["stop_rate"] == 0.75 and result["stopped"] == 3 and result["n"] == 4
    assert 0.2 < result["ci_low"] < 0.75 < result["ci_high"] < 1.0
    assert stats.generation_health([])["stop_rate"] is None


def test_select_examples_follows_the_stated_rule():
    pairs = [
        {
            "id": f"ei-{i:03d}",
            "category": "abc"[i % 3],
            "prompt": "p",
            "baseline": "b",
            "trained": "t",
            "score_delta": delta,
        }
        for i, delta in enumerate(
            [2.0, -1.5, 0.5, None, 1.0, -0.2, 1.7, 0.0, None, 0.9, 1.2, 0.3, None, -2.0]
        )
    ]
    chosen = stats.select_examples(pairs, k=10, seed=4)
    assert len(chosen) == 10 and len({c["id"] for c in chosen}) == 10
    # 6 largest improvements, in order, then the 2 largest regressions
    assert [c["score_delta"] for c in chosen[:6]] == [2.0, 1.7, 1.2, 1.0, 0.9, 0.5]
    assert all("largest rated improvement" in c["reason"] for c in chosen[:6])
    assert [c["score_delta"] for c in chosen[6:8]] == [-2.0, -1.5]
    assert all("seeded draw" in c["reason"] for c in chosen[8:])
    assert stats.select_examples(pairs, k=10, seed=4) == chosen  # reproducible
    unrated = [{**p, "score_delta": None} for p in pairs]
    drawn = stats.select_examples(unrated, k=6, seed=1)
    assert sorted(c["category"] for c in drawn) == ["a", "a", "b", "b", "c", "c"]  # stratified


def test_display_lines_match_the_spec():
    assert (
        stats.display_line("Perplexity", 24.5, 16.8, higher_is_better=False)
        == "Perplexity: 24.5 -> 16.8 (31% improvement)"
    )
    assert (
        stats.display_line("Emotional Intelligence", 3.2, 4.5, "/5")
        == "Emotional Intelligence: 3.2/5 -> 4.5/5 (41% improvement)"
    )
    assert stats.display_line("Score", 4.0, 3.0, "/5") == "Score: 4.0/5 -> 3.0/5 (25% worse)"
    assert stats.display_line("Score", None, 3.0) == "Score: not available"
