"""Reliability statistics against hand-computed values and the packages' documented examples."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jobs.batch import stats

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the 4 coders x 12 units
# example with missing values; the package's documentation and tests use the same data.
KRIPPENDORFF_2011 = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, np.nan, np.nan, np.nan],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, np.nan, 3],
    [np.nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, np.nan],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, np.nan],
]


@pytest.mark.parametrize(
    ("level", "expected"),
    [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849), ("ratio", 0.797)],
)
def test_alpha_matches_the_published_example(level, expected):
    result = stats.krippendorff_alpha(
        np.array(KRIPPENDORFF_2011, dtype=float), level=level, seed=1, n_boot=200
    )
    assert result["alpha"] == pytest.approx(expected, abs=0.0005)
    # Unit 12 has one value only: not pairable, dropped; 11 units remain.
    assert result["n_units"] == 11 and result["n_coders"] == 4
    assert result["ci_low"] <= result["alpha"] <= result["ci_high"]


def test_alpha_by_hand_for_two_coders_nominal():
    # Two coders, 4 units: (a,a) (a,b) (b,b) (b,b). Coincidences: a-a 2, a-b 1, b-a 1, b-b 4;
    # n=8, n_a=3, n_b=5. Do = 2/8; De = 2*3*5/(8*7) = 30/56. alpha = 1 - Do/De = 1 - 0.25*56/30.
    matrix = np.array([[0, 0, 1, 1], [0, 1, 1, 1]], dtype=float)
    result = stats.krippendorff_alpha(matrix, level="nominal", seed=0, n_boot=50)
    assert result["alpha"] == pytest.approx(1 - 0.25 * 56 / 30, abs=1e-6)


def test_mean_sd_and_t_interval_by_hand():
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    low, high = stats.t_interval(values)
    # sd = sqrt(2.5); t(0.975, 4) = 2.776445; half-width = 2.776445 * 1.581139 / sqrt(5)
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert (low, high) == pytest.approx((3 - half, 3 + half), abs=1e-5)
    blow, bhigh = stats.bootstrap_mean(values, seed=3)
    assert 1 <= blow < 3 < bhigh <= 5
    assert stats.t_interval(np.array([2.0, 2.0])) == (2.0, 2.0)
    assert stats.t_interval(np.array([2.0])) == (None, None)


def _frame(matrix: np.ndarray) -> pd.DataFrame:
    rows = [
        {"unit": f"u{i}", "run": j + 1, "value": float(matrix[i, j])}
        for i in range(matrix.shape[0])
        for j in range(matrix.shape[1])
    ]
    return pd.DataFrame(rows)


def test_icc2_against_the_mean_squares_by_hand():
    rng = np.random.default_rng(5)
    truth = rng.normal(50, 10, 8)
    matrix = truth[:, None] + rng.normal(0, 3, (8, 4)) + np.array([0, 1, -1, 2])
    n, k = matrix.shape
    grand = matrix.mean()
    msr = k * ((matrix.mean(axis=1) - grand) ** 2).sum() / (n - 1)
    msc = n * ((matrix.mean(axis=0) - grand) ** 2).sum() / (k - 1)
    sse = ((matrix - matrix.mean(axis=1, keepdims=True) - matrix.mean(axis=0) + grand) ** 2).sum()
    mse = sse / ((n - 1) * (k - 1))
    expected = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
    result = stats.icc(_frame(matrix))
    assert result["form"] == "ICC2" and result["n_units"] == 8 and result["n_runs"] == 4
    assert result["icc"] == pytest.approx(expected, abs=1e-6)
    assert result["ci_low"] <= result["icc"] <= result["ci_high"]


def test_icc2_on_pingouins_documented_wine_example():
    import pingouin

    path = Path(pingouin.__file__).parent / "datasets" / "icc.csv"
    data = pd.read_csv(path).rename(columns={"Wine": "unit", "Judge": "run", "Scores": "value"})
    # pingouin's documentation of intraclass_corr: ICC2 = 0.727689 on this dataset.
    assert stats.icc(data)["icc"] == pytest.approx(0.727689, abs=1e-6)


def test_icc_needs_five_units():
    assert stats.icc(_frame(np.arange(8, dtype=float).reshape(4, 2)))["icc"] is None


def _raw(values: dict) -> list[dict]:
    rows = []
    for (unit, model, run), answer in values.items():
        rows.append(
            {
                "custom_id": f"{unit}-{model}-{run}",
                "unit": unit,
                "framework": "f@1.0.0",
                "model": model,
                "run": run,
                "status": "succeeded",
                "raw_output": answer,
            }
        )
    return rows


FRAMEWORK = {
    "f@1.0.0": {
        "fields": [
            {"key": "score", "level": "interval", "range": [0, 10]},
            {"key": "kind", "level": "nominal", "values": ["a", "b"]},
        ],
        "answer_schema": {
            "type": "object",
            "required": ["score", "kind"],
            "properties": {"score": {"type": "number"}, "kind": {"enum": ["a", "b"]}},
        },
    }
}


def test_compute_end_to_end_is_deterministic_and_counts_units():
    values = {}
    for u in range(6):
        for model in ("m1", "m2"):
            for run in (1, 2, 3):
                score = u + (run % 2) * 0.5 + (model == "m2")
                kind = "a" if u % 2 else "b"
                values[(f"t{u}#0", model, run)] = (
                    f'```json\n{{"score": {score}, "kind": "{kind}"}}\n```'
                )
    raw = _raw(values)
    _v, per_text, agreement = stats.compute(raw, FRAMEWORK, n_boot=100)
    _v2, per_text2, agreement2 = stats.compute(raw, FRAMEWORK, n_boot=100)
    assert stats.to_csv(per_text) == stats.to_csv(per_text2)
    assert stats.to_csv(agreement) == stats.to_csv(agreement2)
    row = per_text[
        (per_text.unit == "t0#0") & (per_text.field == "score") & (per_text.model == "m1")
    ]
    assert row.iloc[0]["n"] == 3 and row.iloc[0]["mean"] == pytest.approx(
        (0.5 + 0 + 0.5) / 3, abs=1e-6
    )
    kinds = per_text[per_text.field == "kind"]
    assert set(kinds["mode_share"]) == {1.0}
    between = agreement[(agreement.between == "models") & (agreement.field == "kind")]
    assert between.iloc[0]["value"] == pytest.approx(1.0) and between.iloc[0]["n_units"] == 6
    icc_rows = agreement[agreement.statistic == "ICC2"]
    assert len(icc_rows) == 2 and (icc_rows.n_units == 6).all()


def test_a_stored_answer_that_does_not_validate_is_refused():
    raw = _raw({("t0#0", "m1", 1): '{"score": 3, "kind": "zzz"}'})
    with pytest.raises(ValueError, match="does not validate"):
        stats.values_table(raw, FRAMEWORK)
