"""The client-ready validation report: HTML (Django template) -> PDF (weasyprint), with charts
drawn server-side by matplotlib as SVG.

``render_report_pdf(context)`` is pure: the same context gives the same PDF content (charts use
a fixed SVG hash salt and no dates; the PDF's creation date is the context's ``generated_at``).
The executive summary is written here from the metrics, in plain language; missing parts (no
human ratings yet, no held-out split) are said so rather than left blank.

Context keys: see evaluation/INTERFACES.md. ``metrics.emotional_intelligence.per_dimension`` is
``{key: {"baseline_mean", "trained_mean"}}``; ``metrics.brand_voice`` may carry ``baseline`` (the
same dict for the base model's responses) and ``names`` ({key: display name}).
"""

from __future__ import annotations

import base64
import io
import math
from datetime import UTC, datetime
from typing import Any

from evaluation import stats

PASS, FAIL, ALERT, PENDING = "pass", "fail", "alert", "pending"
EXAMPLE_MAX_CHARS = 1400
COLORS = {
    "baseline": "#98a2b3",
    "trained": "#4f46e5",
    "pass": "#17b26a",
    "fail": "#f04438",
    "warn": "#f79009",
    "grid": "#e4e7ec",
    "text": "#344054",
    "muted": "#667085",
}


# ------------------------------------------------------------------ formatting


def _f(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{_f(value, digits)}%"


def _ci(metric: dict, digits: int = 1, unit: str = "%") -> str:
    low, high = metric.get("ci_low"), metric.get("ci_high")
    if low is None or high is None:
        return "interval not available (fewer than two units)"
    return f"95% CI {_f(low, digits)}{unit} to {_f(high, digits)}{unit}"


def _when(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%d %B %Y, %H:%M UTC")
    return str(value) if value else "n/a"


def _label(key: str) -> str:
    return key.replace("_", " ").strip().capitalize()


def _flatten(prefix: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        rows = []
        for key in sorted(value):
            rows += _flatten(f"{prefix}.{key}" if prefix else str(key), value[key])
        return rows
    if isinstance(value, list | tuple):
        return [(prefix, ", ".join(str(v) for v in value))]
    return [(prefix, "n/a" if value is None else str(value))]


# ------------------------------------------------------------------ charts


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(
        buffer.getvalue().encode("utf-8")
    ).decode("ascii")


def _axes_style(ax) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color(COLORS["grid"])
    ax.tick_params(colors=COLORS["text"], labelsize=8.5)
    ax.yaxis.grid(True, color=COLORS["grid"], linewidth=0.6)
    ax.set_axisbelow(True)


def _figure(width: float, height: float, ncols: int = 1, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams.update(
        {
            "svg.hashsalt": "crucible-report",
            "svg.fonttype": "path",
            "font.family": "DejaVu Sans",
            "font.size": 9,
        }
    )
    return plt.subplots(1, ncols, figsize=(width, height), **kwargs)


def _bar_labels(ax, bars, fmt: str) -> None:
    for bar in bars:
        ax.annotate(
            fmt.format(bar.get_height()),
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            fontsize=8,
            color=COLORS["text"],
        )


def perplexity_chart(p: dict) -> str:
    fig, (left, right) = _figure(7.0, 2.1, 2, gridspec_kw={"width_ratios": [1, 1.5]})
    bars = left.bar(
        ["Baseline", "Trained"],
        [p["baseline"], p["trained"]],
        color=[COLORS["baseline"], COLORS["trained"]],
        width=0.55,
    )
    _bar_labels(left, bars, "{:.1f}")
    left.set_title("Perplexity (lower is better)", fontsize=9, color=COLORS["text"])
    left.set_ylim(0, max(p["baseline"], p["trained"]) * 1.22)
    _axes_style(left)

    value, target = p["improvement_pct"], p["target_pct"]
    low = p.get("ci_low") if p.get("ci_low") is not None else value
    high = p.get("ci_high") if p.get("ci_high") is not None else value
    lo_lim = min(0, low, target) - 5
    hi_lim = max(high, target, value) + 10
    right.axvspan(target, hi_lim, color=COLORS["pass"], alpha=0.08, lw=0)
    right.axvline(target, color=COLORS["pass"], linestyle="--", linewidth=1)
    right.text(target, 1.38, f" target {target:.0f}%", color=COLORS["pass"], fontsize=8)
    right.axvline(0, color=COLORS["grid"], linewidth=1)
    color = COLORS["pass"] if p.get("passed") else COLORS["fail"]
    right.errorbar(
        [value],
        [1],
        xerr=[[value - low], [high - value]],
        fmt="o",
        color=color,
        ecolor=color,
        elinewidth=2,
        capsize=5,
        markersize=7,
    )
    right.annotate(
        f"{value:.1f}%  (95% CI {low:.1f} to {high:.1f})",
        (value, 1),
        xytext=(0, -20),
        textcoords="offset points",
        ha="center",
        fontsize=8,
        color=COLORS["text"],
    )
    right.set_xlim(lo_lim, hi_lim)
    right.set_ylim(0.5, 1.5)
    right.set_yticks([])
    right.set_xlabel("Improvement in perplexity (%)", fontsize=8.5, color=COLORS["text"])
    right.set_title("Improvement with 95% interval", fontsize=9, color=COLORS["text"])
    _axes_style(right)
    right.yaxis.grid(False)
    right.xaxis.grid(True, color=COLORS["grid"], linewidth=0.6)
    fig.tight_layout()
    return _svg(fig)


def retention_chart(r: dict) -> str:
    categories = list(r.get("by_category") or {})
    labels = [*(_label(c) for c in categories), "All questions"]
    base = [r["by_category"][c]["baseline_accuracy"] * 100 for c in categories]
    trained = [r["by_category"][c]["trained_accuracy"] * 100 for c in categories]
    base.append(r["baseline_accuracy"] * 100)
    trained.append(r["trained_accuracy"] * 100)
    fig, ax = _figure(7.0, 2.2)
    x = list(range(len(labels)))
    width = 0.36
    b1 = ax.bar([i - width / 2 for i in x], base, width, label="Baseline", color=COLORS["baseline"])
    b2 = ax.bar(
        [i + width / 2 for i in x], trained, width, label="Trained", color=COLORS["trained"]
    )
    _bar_labels(ax, b1, "{:.0f}")
    _bar_labels(ax, b2, "{:.0f}")
    ax.axhline(25, color=COLORS["muted"], linestyle=":", linewidth=1, label="Chance (25%)")
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 128)
    ax.set_yticks([0, 25, 50, 75, 100])
    ax.set_ylabel("Correct answers (%)", fontsize=8.5, color=COLORS["text"])
    ax.legend(frameon=False, fontsize=8, ncols=3, loc="upper left")
    _axes_style(ax)
    fig.tight_layout()
    return _svg(fig)


def ei_chart(ei: dict) -> str:
    per_dim = ei.get("per_dimension") or {}
    keys = list(per_dim)
    base = [_dim_value(per_dim[k], "baseline") for k in keys]
    trained = [_dim_value(per_dim[k], "trained") for k in keys]
    keys.append("overall")
    base.append(ei["baseline_mean"])
    trained.append(ei["trained_mean"])
    fig, ax = _figure(7.0, 2.1)
    x = list(range(len(keys)))
    width = 0.36
    b1 = ax.bar([i - width / 2 for i in x], base, width, label="Baseline", color=COLORS["baseline"])
    b2 = ax.bar(
        [i + width / 2 for i in x], trained, width, label="Trained", color=COLORS["trained"]
    )
    _bar_labels(ax, b1, "{:.1f}")
    _bar_labels(ax, b2, "{:.1f}")
    ax.set_xticks(x, [_dim_name(per_dim.get(k), k) for k in keys])
    ax.set_ylim(0, 6.2)
    ax.set_yticks([1, 2, 3, 4, 5])
    ax.set_ylabel("Mean rating (1-5)", fontsize=8.5, color=COLORS["text"])
    ax.legend(frameon=False, fontsize=8, ncols=2, loc="upper left")
    _axes_style(ax)
    fig.tight_layout()
    return _svg(fig)


def _dim_name(row: Any, key: str) -> str:
    return row.get("name") or _label(key) if isinstance(row, dict) else _label(key)


def _dim_value(row: Any, side: str) -> float:
    if isinstance(row, dict):
        value = row.get(f"{side}_mean", row.get(side))
        return float(value) if value is not None else 0.0
    return float(row)


def brand_chart(b: dict, names: dict[str, str]) -> str:
    per = b.get("per_characteristic") or {}
    keys = list(per)[::-1]
    baseline = (b.get("baseline") or {}).get("per_characteristic") or {
        k: {"mean": v["baseline_mean"]}
        for k, v in per.items()
        if v.get("baseline_mean") is not None
    }
    fig, ax = _figure(7.0, 0.27 * len(keys) + 0.8)
    values = [per[k]["mean"] for k in keys]
    colors = [
        COLORS["pass"]
        if v >= stats.RUBRIC_MAX * b["target_pct"] / 100
        else COLORS["fail"]
        if v < b.get("threshold", stats.BRAND_FLAG_BELOW)
        else COLORS["warn"]
        for v in values
    ]
    y = list(range(len(keys)))
    height = 0.38 if baseline else 0.6
    if baseline:
        ax.barh(
            [i - height / 2 for i in y],
            [baseline.get(k, {}).get("mean", 0) for k in keys],
            height,
            color=COLORS["baseline"],
            label="Baseline",
        )
    bars = ax.barh(
        [i + (height / 2 if baseline else 0) for i in y],
        values,
        height,
        color=colors,
        label="Trained",
    )
    for bar, value in zip(bars, values, strict=True):
        ax.text(
            value + 0.05,
            bar.get_y() + bar.get_height() / 2,
            f"{value:.2f}",
            va="center",
            fontsize=7.5,
            color=COLORS["text"],
        )
    target = stats.RUBRIC_MAX * b["target_pct"] / 100
    ax.axvline(target, color=COLORS["pass"], linestyle="--", linewidth=1)
    ax.axvline(b.get("threshold", 3), color=COLORS["fail"], linestyle=":", linewidth=1)
    ax.text(target, len(keys) - 0.3, f" target {target:.2f}", fontsize=7.5, color=COLORS["pass"])
    ax.set_yticks(y, [per[k].get("name") or names.get(k, _label(k)) for k in keys])
    ax.set_xlim(0, 5.6)
    ax.set_xticks([1, 2, 3, 4, 5])
    ax.set_xlabel("Mean score (1-5)", fontsize=8.5, color=COLORS["text"])
    if baseline:
        ax.legend(frameon=False, fontsize=8, loc="lower right")
    _axes_style(ax)
    ax.yaxis.grid(False)
    ax.xaxis.grid(True, color=COLORS["grid"], linewidth=0.6)
    fig.tight_layout()
    return _svg(fig)


def health_chart(health: dict) -> str:
    rows = [(n, health.get(n)) for n in ("baseline", "trained") if health.get(n)]
    fig, ax = _figure(3.4, 1.5)
    for i, (name, h) in enumerate(rows):
        rate = (h.get("stop_rate") or 0) * 100
        ax.barh([i], [rate], 0.55, color=COLORS[name])
        if h.get("ci_low") is not None:
            ax.errorbar(
                [rate],
                [i],
                xerr=[[rate - h["ci_low"] * 100], [h["ci_high"] * 100 - rate]],
                fmt="none",
                ecolor=COLORS["text"],
                capsize=3,
                elinewidth=1,
            )
        ax.text(102, i, f"{rate:.0f}%", va="center", fontsize=8, color=COLORS["text"])
    ax.set_yticks(range(len(rows)), [_label(n) for n, _ in rows])
    ax.set_xlim(0, 115)
    ax.set_xticks([0, 25, 50, 75, 100])
    ax.set_xlabel("Responses that ended on their own (%)", fontsize=8, color=COLORS["text"])
    _axes_style(ax)
    ax.yaxis.grid(False)
    fig.tight_layout()
    return _svg(fig)


# ------------------------------------------------------------------ summary and cards


def _card(key, title, status, headline, detail, interval, target, note="") -> dict:
    return {
        "key": key,
        "title": title,
        "status": status,
        "status_label": {
            PASS: "Target met",
            FAIL: "Below target",
            ALERT: "Alert",
            PENDING: "Pending",
        }[status],
        "headline": headline,
        "detail": detail,
        "interval": interval,
        "target": target,
        "note": note,
    }


def build_view(context: dict) -> dict:
    """Everything the template shows, computed from the context (no I/O)."""
    metrics = context.get("metrics") or {}
    p = metrics.get("perplexity")
    r = metrics.get("retention")
    ei = metrics.get("emotional_intelligence")
    bv = metrics.get("brand_voice")
    health = metrics.get("generation_health") or {}
    cards, summary, charts = [], [], {}
    arrow = "→"

    if p:
        status = PASS if p.get("passed") else FAIL
        cards.append(
            _card(
                "perplexity",
                "Perplexity",
                status,
                f"{_f(p['improvement_pct'], 0)}% improvement",
                stats.display_line(
                    "Perplexity", p["baseline"], p["trained"], higher_is_better=False, arrow=arrow
                ),
                _ci(p),
                f"Target: ≥ {p['target_pct']:.0f}% improvement",
                f"{p['n_documents']} held-out conversations, {p.get('n_tokens', 'n/a')} tokens",
            )
        )
        text = (
            f"On conversations held back from training, the trained model predicts the expected "
            f"replies markedly {'better' if p['improvement_pct'] > 0 else 'worse'}: perplexity "
            f"went from {_f(p['baseline'])} to {_f(p['trained'])}, a "
            f"{_f(abs(p['improvement_pct']), 0)}% "
            f"{'improvement' if p['improvement_pct'] > 0 else 'deterioration'} "
            f"({_ci(p, 0)}). "
        )
        if p.get("passed"):
            text += f"This meets the {p['target_pct']:.0f}% target"
            if p.get("ci_low") is not None and p["ci_low"] < p["target_pct"]:
                text += ", although the interval includes values below it"
            text += "."
        else:
            text += f"This is below the {p['target_pct']:.0f}% target."
        summary.append(text)
        charts["perplexity"] = perplexity_chart(p)
    else:
        cards.append(
            _card(
                "perplexity",
                "Perplexity",
                PENDING,
                "Not measured",
                "No held-out conversations were available",
                "",
                f"Target: ≥ {stats.PERPLEXITY_TARGET_PCT:.0f}% improvement",
            )
        )
        summary.append("Perplexity was not measured: the job has no held-out conversations.")

    if r:
        status = ALERT if r.get("alert") else PASS
        retained = r.get("retention_pct")
        cards.append(
            _card(
                "retention",
                "Knowledge retention",
                status,
                f"{_f(retained)}% retained",
                f"Accuracy {_pct(r['baseline_accuracy'] * 100, 0)} {arrow} "
                f"{_pct(r['trained_accuracy'] * 100, 0)} on {r['n_questions']} questions",
                _ci(r),
                f"Alert below {r['threshold_pct']:.0f}%",
            )
        )
        text = (
            "The model kept its general financial knowledge"
            if not r.get("alert")
            else "Warning: the model lost some general financial knowledge"
        )
        text += (
            f": it answered {_pct(r['trained_accuracy'] * 100, 0)} of {r['n_questions']} "
            f"questions on taxes, retirement, investing and insurance correctly, against "
            f"{_pct(r['baseline_accuracy'] * 100, 0)} for the base model — a retention of "
            f"{_pct(retained)} ({_ci(r, 0)})."
        )
        if r.get("alert"):
            text += (
                f" This is below the {r['threshold_pct']:.0f}% threshold, a typical sign of "
                "overtraining; retraining with a lower learning rate or fewer epochs is advised."
            )
        summary.append(text)
        if r.get("by_category"):
            charts["retention"] = retention_chart(r)

    ei_target = (ei or {}).get("target_pct") or stats.EI_TARGET_PCT
    if ei and ei.get("improvement_pct") is not None:
        source = {
            "human": "human raters",
            "judge": "an automated judge",
            "human+judge": "human raters and an automated judge",
        }.get(ei.get("source") or "", "raters")
        cards.append(
            _card(
                "emotional_intelligence",
                "Emotional intelligence",
                PASS if ei.get("passed") else FAIL,
                f"{_f(ei['improvement_pct'], 0)}% improvement",
                stats.display_line(
                    "Score", ei["baseline_mean"], ei["trained_mean"], "/5", arrow=arrow
                ),
                _ci(ei),
                f"Target: ≥ {ei_target:.0f}% improvement",
                f"{ei['n']} scenarios, rated by {source}",
            )
        )
        text = (
            f"In {ei['n']} emotionally charged client scenarios, {source} scored the replies "
            f"(blind to which model wrote them) {_f(ei['baseline_mean'])}/5 for the base model "
            f"and {_f(ei['trained_mean'])}/5 for the trained model on empathy, clarity and "
            f"appropriateness: a {_f(ei['improvement_pct'], 0)}% "
            f"{'improvement' if ei['improvement_pct'] >= 0 else 'decline'} ({_ci(ei, 0)}), "
            f"{'meeting' if ei.get('passed') else 'below'} the {ei_target:.0f}% target."
        )
        agreement = ei.get("agreement")
        if agreement and agreement.get("alpha") is not None:
            text += (
                f" Human raters and the automated judge agreed with Krippendorff's alpha "
                f"{_f(agreement['alpha'], 2)}."
            )
        summary.append(text)
        if ei.get("per_dimension"):
            charts["emotional_intelligence"] = ei_chart(ei)
    else:
        cards.append(
            _card(
                "emotional_intelligence",
                "Emotional intelligence",
                PENDING,
                "Awaiting human ratings",
                "Baseline and trained replies are ready for blind rating",
                "",
                f"Target: ≥ {ei_target:.0f}% improvement",
            )
        )
        summary.append(
            "Emotional intelligence: the replies of both models to the scenarios are ready; "
            "the figure appears once they have been rated (awaiting human ratings)."
        )

    names = dict((bv or {}).get("names") or {})
    if bv and bv.get("consistency_pct") is not None:
        if not names:
            names = _default_brand_names()
        flagged = len(bv.get("flagged") or [])
        cards.append(
            _card(
                "brand_voice",
                "Brand voice",
                PASS if bv.get("passed") else FAIL,
                f"{_f(bv['consistency_pct'], 0)}% consistency",
                f"Mean {_f(bv['mean_score'], 2)}/5 over {bv['n_responses']} responses; "
                f"{flagged} flagged",
                _ci(bv),
                f"Target: ≥ {bv['target_pct']:.0f}% (≥ {bv['target_pct'] / 20:.2f}/5)",
            )
        )
        weakest = sorted(
            (bv.get("per_characteristic") or {}).items(), key=lambda kv: kv[1]["mean"]
        )[:1]
        text = (
            f"Brand voice: the trained model's replies scored {_f(bv['mean_score'], 2)}/5 on "
            f"the persona's characteristics, a consistency of {_pct(bv['consistency_pct'], 0)} "
            f"({_ci(bv, 0)}), {'meeting' if bv.get('passed') else 'below'} the "
            f"{bv['target_pct']:.0f}% target."
        )
        if weakest:
            key, row = weakest[0]
            text += (
                f" Weakest characteristic: {names.get(key, _label(key))} ({_f(row['mean'], 2)}/5)."
            )
        if flagged:
            text += f" {flagged} response(s) scored below 3 on at least one characteristic."
        summary.append(text)
        if bv.get("per_characteristic"):
            charts["brand_voice"] = brand_chart(bv, names)
    else:
        cards.append(
            _card(
                "brand_voice",
                "Brand voice",
                PENDING,
                "Awaiting human ratings",
                "Responses are ready for scoring on the persona rubric",
                "",
                f"Target: ≥ {stats.BRAND_TARGET_PCT:.0f}% consistency",
            )
        )
        summary.append("Brand voice: responses are ready; awaiting human ratings.")

    if health.get("trained"):
        t, b = health["trained"], health.get("baseline") or {}
        text = (
            f"Generation health: {_pct((t.get('stop_rate') or 0) * 100, 0)} of the trained "
            f"model's replies ended on their own before the {health.get('max_new_tokens', 'n/a')}"
            f"-token limit"
        )
        if b:
            text += f" (base model: {_pct((b.get('stop_rate') or 0) * 100, 0)})"
        summary.append(text + ".")
        charts["health"] = health_chart(health)

    measured = [c for c in cards if c["status"] != PENDING]
    met = [c for c in measured if c["status"] == PASS]
    pending = [c for c in cards if c["status"] == PENDING]
    verdict = f"{len(met)} of {len(measured)} measured targets met"
    if pending:
        verdict += f"; {len(pending)} awaiting ratings or data"
    verdict_status = (
        PENDING if not measured else PASS if len(met) == len(measured) and not pending else FAIL
    )
    if measured and len(met) == len(measured) and pending:
        verdict_status = PENDING
    return {
        "cards": cards,
        "summary": summary,
        "charts": charts,
        "verdict": verdict,
        "verdict_status": verdict_status,
        "brand_names": names,
    }


def _default_brand_names() -> dict[str, str]:
    try:
        from evaluation.suites import load_suite

        suite = load_suite("brand_voice")
        return {c["key"]: c["name"] for c in suite.data["persona"]["characteristics"]}
    except Exception:
        return {}


def _interval_row(metric: str, d: dict, value, n: str, fmt=_pct, digits: int = 2) -> dict:
    """One row of the appendix's intervals table: estimate, 95% interval, method, resamples."""
    return {
        "metric": metric,
        "value": fmt(value, digits),
        "interval": f"{fmt(d.get('ci_low'), digits)} to {fmt(d.get('ci_high'), digits)}",
        "n": n,
        "method": d.get("ci_method") or "n/a",
        "boot": f"{d.get('n_boot')} / seed {d.get('seed')}",
    }


def _interval_rows(metrics: dict) -> list[dict]:
    rows = []
    p = metrics.get("perplexity")
    if p:
        rows.append(
            _interval_row(
                "Perplexity improvement", p, p["improvement_pct"], f"{p['n_documents']} documents"
            )
        )
    r = metrics.get("retention")
    if r:
        rows.append(
            _interval_row(
                "Knowledge retention", r, r.get("retention_pct"), f"{r['n_questions']} questions"
            )
        )
    ei = metrics.get("emotional_intelligence")
    if ei and ei.get("improvement_pct") is not None:
        rows.append(
            _interval_row(
                "Emotional intelligence improvement",
                ei,
                ei["improvement_pct"],
                f"{ei['n']} scenarios",
            )
        )
        agreement = ei.get("agreement")
        if agreement and agreement.get("alpha") is not None:
            rows.append(
                _interval_row(
                    "Judge-human agreement (Krippendorff's alpha)",
                    agreement,
                    agreement["alpha"],
                    f"{agreement['n_units']} units, {agreement['n_raters']} raters",
                    fmt=_f,
                    digits=3,
                )
            )
    bv = metrics.get("brand_voice")
    if bv and bv.get("consistency_pct") is not None:
        rows.append(
            _interval_row(
                "Brand voice consistency",
                bv,
                bv["consistency_pct"],
                f"{bv['n_responses']} responses",
            )
        )
    health = metrics.get("generation_health") or {}
    for side in ("baseline", "trained"):
        h = health.get(side)
        if h and h.get("stop_rate") is not None:
            rows.append(
                {
                    "metric": f"Stop rate ({side})",
                    "value": _pct(h["stop_rate"] * 100, 1),
                    "interval": f"{_pct((h.get('ci_low') or 0) * 100, 1)} to "
                    f"{_pct((h.get('ci_high') or 0) * 100, 1)}",
                    "n": f"{h['n']} responses",
                    "method": h.get("ci_method") or "n/a",
                    "boot": "exact",
                }
            )
    return rows


def _examples(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows or []:
        item = dict(row)
        for key in ("prompt", "baseline", "trained"):
            text = str(item.get(key) or "")
            item[f"{key}_short"] = len(text) > EXAMPLE_MAX_CHARS
            item[key] = text[:EXAMPLE_MAX_CHARS].rstrip() + (
                "…" if len(text) > EXAMPLE_MAX_CHARS else ""
            )
        out.append(item)
    return out


def report_context(context: dict) -> dict:
    from evaluation.scoring import METHODS

    metrics = context.get("metrics") or {}
    view = build_view(context)
    job = context.get("job") or {}
    run = context.get("run") or {}
    bv = metrics.get("brand_voice") or {}
    names = view["brand_names"] or _default_brand_names()
    brand_rows = [
        {**v, "name": v.get("name") or names.get(k, _label(k))}
        for k, v in (bv.get("per_characteristic") or {}).items()
    ]
    flagged = [
        {
            "index": f["index"],
            "label": f.get("item_id") or f"response {f['index'] + 1}",
            "characteristics": ", ".join(
                f"{names.get(k, _label(k))} {_f(v, 1)}" for k, v in f["characteristics"].items()
            ),
        }
        for f in bv.get("flagged") or []
    ]
    r = metrics.get("retention") or {}
    retention_rows = [
        {
            "category": _label(c),
            "n": v["n"],
            "baseline": _pct(v["baseline_accuracy"] * 100, 0),
            "trained": _pct(v["trained_accuracy"] * 100, 0),
            "retention": _pct(v.get("retention_pct"), 1),
        }
        for c, v in (r.get("by_category") or {}).items()
    ]
    ei = metrics.get("emotional_intelligence") or {}
    ei_rows = [
        {
            "name": _dim_name(v, k),
            "baseline": _f(_dim_value(v, "baseline"), 2),
            "trained": _f(_dim_value(v, "trained"), 2),
        }
        for k, v in (ei.get("per_dimension") or {}).items()
    ]
    generated = context.get("generated_at")
    return {
        **view,
        "title": context.get("title") or "Validation report",
        "generated_at": _when(generated),
        "generated_iso": generated.isoformat() if isinstance(generated, datetime) else "",
        "job": job,
        "run": run,
        "run_started": _when(run.get("started_at")),
        "run_completed": _when(run.get("completed_at")),
        "suites": sorted((run.get("suites") or {}).items()),
        "suite_hashes": run.get("suite_hashes") or {},
        "decoding": _flatten("", run.get("decoding") or {}),
        "seeds": _flatten("", run.get("seeds") or {}),
        "configuration": _flatten("", job.get("configuration") or {}),
        "metrics": metrics,
        "interval_rows": _interval_rows(metrics),
        "retention_rows": retention_rows,
        "ei_rows": ei_rows,
        "ei_agreement": ei.get("agreement"),
        "brand_rows": brand_rows,
        "flagged": flagged,
        "examples": _examples(context.get("examples") or []),
        "approval": context.get("approval"),
        "approval_at": _when((context.get("approval") or {}).get("at")),
        "methods": METHODS,
        "selection_rule": stats.SELECTION_RULE,
        "targets": {
            "perplexity": stats.PERPLEXITY_TARGET_PCT,
            "retention": stats.RETENTION_THRESHOLD_PCT,
            "ei": stats.EI_TARGET_PCT,
            "brand": stats.BRAND_TARGET_PCT,
        },
        "health": metrics.get("generation_health") or {},
        "retention_accuracy": {
            "baseline": _pct(r["baseline_accuracy"] * 100, 0) if r else "n/a",
            "trained": _pct(r["trained_accuracy"] * 100, 0) if r else "n/a",
        },
    }


def report_html(context: dict) -> str:
    from django.template.loader import render_to_string

    return render_to_string("evaluation/report_pdf.html", report_context(context))


def render_report_pdf(context: dict) -> bytes:
    from django.conf import settings
    from weasyprint import HTML

    html = report_html(context)
    return HTML(string=html, base_url=str(settings.BASE_DIR)).write_pdf()
