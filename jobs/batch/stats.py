"""Reliability statistics of a batch job, from its raw outputs.

This module imports no Django and nothing else from Crucible: the replication package ships it
verbatim beside its README's script, which recomputes every figure from the raw outputs.
(It therefore does not reuse evaluation/stats.py's alpha helper: jobs may not import the
evaluation app, and the package must run on its own. The bootstrap over units is the same
method: percentile interval, resamples where alpha is undefined skipped and counted.)

* Per unit (text chunk) x framework x field x model: n, mean, standard deviation (ddof=1),
  variance, a 95% t interval and a 95% percentile bootstrap interval of the mean; for nominal
  fields the mode and its share instead.
* Across runs of one model, per framework x field: ICC(2,1) (two-way random effects, absolute
  agreement, single rater; Shrout & Fleiss 1979, McGraw & Wong 1996) from pingouin for interval
  and ratio fields, units as targets and runs as raters, with pingouin's F-based 95% interval.
* Krippendorff's alpha (package ``krippendorff``) at the field's level of measurement, between
  the runs of each model and between models (each model's unit value: mean for interval/ratio,
  median for ordinal, mode for nominal), with a 95% bootstrap interval resampling units.

Every figure carries the number of units behind it. Seeds are fixed, so recomputation gives
the same numbers.
"""

from __future__ import annotations

import json
import math
import re
import warnings
import zlib
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

CONFIDENCE = 0.95
N_BOOT_MEAN = 2000
N_BOOT_ALPHA = 1000
ICC_FORM = "ICC2"
ICC_NAME = "ICC(2,1): two-way random effects, absolute agreement, single rater"
NUMERIC = ("ordinal", "interval", "ratio")


# --- Answers ------------------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def extract_json(text: str) -> Any:
    """The JSON object in a model's answer: the whole text, else a fenced block, else the
    first balanced ``{...}``. Raises ValueError with the reason."""
    text = (text or "").strip()
    if not text:
        raise ValueError("empty answer")
    candidates = [text, *(m.group(1).strip() for m in _FENCE.finditer(text))]
    start = text.find("{")
    if start >= 0:
        depth = 0
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    candidates.append(text[start : i + 1])
                    break
    last = "no JSON object in the answer"
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError as exc:
            last = f"invalid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})"
    raise ValueError(last)


def values_table(raw_rows: list[dict], frameworks: dict[str, dict]) -> pd.DataFrame:
    """The long table of scored values from raw outputs: one row per (task, field). A raw row
    has custom_id, unit, framework (name@version), model, run, status and raw_output; only
    succeeded tasks count, their answer parsed again and validated against the framework."""
    from jsonschema import Draft202012Validator

    validators = {k: Draft202012Validator(v["answer_schema"]) for k, v in frameworks.items()}
    out = []
    for row in raw_rows:
        if row["status"] != "succeeded":
            continue
        fw = frameworks[row["framework"]]
        parsed = extract_json(row["raw_output"])
        if not validators[row["framework"]].is_valid(parsed):
            raise ValueError(f"{row['custom_id']}: stored answer does not validate")
        for spec in fw["fields"]:
            out.append(
                {
                    "custom_id": row["custom_id"],
                    "unit": row["unit"],
                    "framework": row["framework"],
                    "field": spec["key"],
                    "level": spec["level"],
                    "model": row["model"],
                    "run": int(row["run"]),
                    "value": parsed[spec["key"]],
                }
            )
    columns = ["custom_id", "unit", "framework", "field", "level", "model", "run", "value"]
    return pd.DataFrame(out, columns=columns)


# --- Helpers ------------------------------------------------------------------------------------


def _seed(*parts) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def _r(value, digits: int = 6):
    if value is None:
        return None
    value = float(value)
    return None if not math.isfinite(value) else round(value, digits)


def t_interval(values: np.ndarray) -> tuple[float | None, float | None]:
    from scipy import stats

    n = len(values)
    if n < 2:
        return None, None
    mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    if sd == 0:
        return mean, mean
    half = stats.t.ppf((1 + CONFIDENCE) / 2, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def bootstrap_mean(values: np.ndarray, *, seed: int, n_boot: int = N_BOOT_MEAN):
    n = len(values)
    if n < 2:
        return None, None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, n, (n_boot, n))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def _codes(level: str, values: pd.Series, domain: list | None) -> pd.Series:
    if level == "nominal":
        order = {v: i for i, v in enumerate(domain or sorted(set(values)))}
        return values.map(order).astype(float)
    return values.astype(float)


def krippendorff_alpha(
    matrix: np.ndarray, *, level: str, seed: int, n_boot: int = N_BOOT_ALPHA
) -> dict:
    """Alpha of a coders x units matrix (NaN = missing) with a percentile bootstrap over units
    (only units with two or more values are pairable and kept)."""
    import krippendorff

    pairable = (~np.isnan(matrix)).sum(axis=0) >= 2
    matrix = matrix[:, pairable]
    n_units = int(matrix.shape[1])
    result = {
        "alpha": None,
        "ci_low": None,
        "ci_high": None,
        "n_units": n_units,
        "n_coders": int(matrix.shape[0]),
        "n_boot": n_boot,
        "n_boot_undefined": 0,
    }
    if n_units < 2:
        return result
    domain = np.unique(matrix[~np.isnan(matrix)])

    def alpha_of(m: np.ndarray) -> float:
        if len(np.unique(m[~np.isnan(m)])) < 2:
            return math.nan  # one value everywhere: alpha is 0/0
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                return float(
                    krippendorff.alpha(
                        reliability_data=m, level_of_measurement=level, value_domain=domain
                    )
                )
        except (ValueError, ZeroDivisionError):
            return math.nan

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


def icc(frame: pd.DataFrame, *, form: str = ICC_FORM) -> dict:
    """pingouin's ICC over units (targets) x runs (raters); units missing a run are dropped."""
    import pingouin as pg

    wide = frame.pivot_table(index="unit", columns="run", values="value", aggfunc="first")
    wide = wide.dropna()
    out = {
        "form": form,
        "name": ICC_NAME,
        "icc": None,
        "ci_low": None,
        "ci_high": None,
        "n_units": len(wide),
        "n_runs": int(wide.shape[1]),
    }
    if len(wide) < 5 or wide.shape[1] < 2 or np.nanvar(wide.to_numpy()) == 0:
        return out  # pingouin needs 5 targets; constant data has no variance to explain
    long = wide.reset_index().melt(id_vars="unit", var_name="run", value_name="value")
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        table = pg.intraclass_corr(data=long, targets="unit", raters="run", ratings="value")
    row = table.set_index("Type").loc[form]
    out["icc"] = _r(row["ICC"])
    low, high = row["CI95%"] if "CI95%" in row else row["CI95"]
    out["ci_low"], out["ci_high"] = _r(low), _r(high)
    return out


# --- The job's statistics -----------------------------------------------------------------------


def per_text(values: pd.DataFrame) -> pd.DataFrame:
    rows = []
    keys = ["unit", "framework", "field", "level", "model"]
    for key, group in values.groupby(keys, sort=True):
        level = key[3]
        row = dict(zip(keys, key, strict=True))
        row["n"] = len(group)
        if level == "nominal":
            counts = Counter(group["value"])
            mode, count = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))[0]
            row.update(mode=mode, mode_share=_r(count / len(group)))
        else:
            v = group["value"].astype(float).to_numpy()
            t_low, t_high = t_interval(v)
            b_low, b_high = bootstrap_mean(v, seed=_seed(*key))
            row.update(
                mean=_r(v.mean()),
                median=_r(np.median(v)),
                sd=_r(np.std(v, ddof=1)) if len(v) > 1 else None,
                variance=_r(np.var(v, ddof=1)) if len(v) > 1 else None,
                ci_t_low=_r(t_low),
                ci_t_high=_r(t_high),
                ci_boot_low=_r(b_low),
                ci_boot_high=_r(b_high),
            )
        rows.append(row)
    columns = [
        *keys,
        "n",
        "mean",
        "median",
        "sd",
        "variance",
        "ci_t_low",
        "ci_t_high",
        "ci_boot_low",
        "ci_boot_high",
        "mode",
        "mode_share",
    ]
    return pd.DataFrame(rows, columns=columns)


def _unit_summary(group: pd.DataFrame, level: str):
    if level == "nominal":
        counts = Counter(group)
        return sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))[0][0]
    if level == "ordinal":
        return float(np.median(group.astype(float)))
    return float(group.astype(float).mean())


def agreement(
    values: pd.DataFrame,
    domains: dict[tuple[str, str], list] | None = None,
    *,
    n_boot: int = N_BOOT_ALPHA,
) -> pd.DataFrame:
    """Alpha between runs (per model) and between models, ICC across runs; one row each."""
    domains = domains or {}
    rows = []
    for (framework, field_, level), frame in values.groupby(
        ["framework", "field", "level"], sort=True
    ):
        domain = domains.get((framework, field_))
        coded = frame.assign(value=_codes(level, frame["value"], domain))
        for model, mframe in coded.groupby("model", sort=True):
            wide = mframe.pivot_table(index="run", columns="unit", values="value", aggfunc="first")
            res = krippendorff_alpha(
                wide.to_numpy(dtype=float),
                level=level,
                seed=_seed(framework, field_, model),
                n_boot=n_boot,
            )
            rows.append(
                {
                    "framework": framework,
                    "field": field_,
                    "level": level,
                    "between": "runs",
                    "model": model,
                    "statistic": "krippendorff_alpha",
                    "value": res["alpha"],
                    "ci_low": res["ci_low"],
                    "ci_high": res["ci_high"],
                    "n_units": res["n_units"],
                    "n_raters": res["n_coders"],
                    "n_boot_undefined": res["n_boot_undefined"],
                }
            )
            if level in ("interval", "ratio"):
                res = icc(mframe)
                rows.append(
                    {
                        "framework": framework,
                        "field": field_,
                        "level": level,
                        "between": "runs",
                        "model": model,
                        "statistic": res["form"],
                        "value": res["icc"],
                        "ci_low": res["ci_low"],
                        "ci_high": res["ci_high"],
                        "n_units": res["n_units"],
                        "n_raters": res["n_runs"],
                        "n_boot_undefined": None,
                    }
                )
        summary = (
            frame.groupby(["model", "unit"], sort=True)["value"]
            .apply(lambda g, level=level: _unit_summary(g, level))
            .reset_index()
        )
        if summary["model"].nunique() >= 2:
            summary = summary.assign(value=_codes(level, summary["value"], domain))
            wide = summary.pivot_table(
                index="model", columns="unit", values="value", aggfunc="first"
            )
            res = krippendorff_alpha(
                wide.to_numpy(dtype=float),
                level=level,
                seed=_seed(framework, field_, "models"),
                n_boot=n_boot,
            )
            rows.append(
                {
                    "framework": framework,
                    "field": field_,
                    "level": level,
                    "between": "models",
                    "model": "",
                    "statistic": "krippendorff_alpha",
                    "value": res["alpha"],
                    "ci_low": res["ci_low"],
                    "ci_high": res["ci_high"],
                    "n_units": res["n_units"],
                    "n_raters": res["n_coders"],
                    "n_boot_undefined": res["n_boot_undefined"],
                }
            )
    columns = [
        "framework",
        "field",
        "level",
        "between",
        "model",
        "statistic",
        "value",
        "ci_low",
        "ci_high",
        "n_units",
        "n_raters",
        "n_boot_undefined",
    ]
    return pd.DataFrame(rows, columns=columns)


def domains_of(frameworks: dict[str, dict]) -> dict[tuple[str, str], list]:
    return {
        (name, spec["key"]): spec["values"]
        for name, fw in frameworks.items()
        for spec in fw["fields"]
        if spec["level"] == "nominal"
    }


def compute(raw_rows: list[dict], frameworks: dict[str, dict], *, n_boot: int = N_BOOT_ALPHA):
    """(values, per_text, agreement) DataFrames from raw outputs."""
    values = values_table(raw_rows, frameworks)
    return values, per_text(values), agreement(values, domains_of(frameworks), n_boot=n_boot)


def to_csv(frame: pd.DataFrame) -> str:
    """The CSV the package stores (and the script compares): fixed float format, \\n lines."""
    return frame.to_csv(index=False, lineterminator="\n", float_format="%.6f")
