"""Alternating measurement for the benches: subject and baseline(s) take turns.

Fair comparisons: the order of subject and baseline
alternates, so neither always runs first on a warm or cold machine or in a quiet or busy
moment of a shared one, and every figure is a median of the same number of runs on both
sides. ``alternate`` runs two callables in ABBA order (A B, then B A, ...); ``rotate`` runs
any number of them with the starting one rotating every round. ``spread`` formats a median
with its interquartile range and min-max, which every bench prints next to its ratio.

Not a bench: ``bench/run.py`` only picks up files named ``bench_*.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def _timed_ms(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def rotate(
    fns: Sequence[tuple[str, Callable[[], object]]],
    rounds: int,
    *,
    before: Callable[[], object] | None = None,
    self_timed: bool = False,
    on_round: Callable[[int, list[str]], object] | None = None,
) -> dict[str, list[float]]:
    """Run every callable once a round for ``rounds`` rounds, the first one rotating each
    round (with two callables: A B, B A, A B, ...). Returns each name's samples in round
    order (index i of every list comes from the same round, so pairs can be subtracted).

    A sample is the call's wall time in ms, or, with ``self_timed``, what the call returns
    (a rate, or a time it measured itself without its set-up). ``before`` runs before each
    call, outside the timing (e.g. clearing a cache). ``on_round(i, names)`` is told the
    order of each round before it runs (for benches that print it)."""
    samples: dict[str, list[float]] = {name: [] for name, _ in fns}
    for round_ in range(rounds):
        shift = round_ % len(fns)
        order = list(fns[shift:]) + list(fns[:shift])
        if on_round is not None:
            on_round(round_, [name for name, _ in order])
        for name, fn in order:
            if before is not None:
                before()
            samples[name].append(float(fn()) if self_timed else _timed_ms(fn))
    return samples


def alternate(
    subject: Callable[[], object],
    baseline: Callable[[], object],
    rounds: int,
    *,
    before: Callable[[], object] | None = None,
    self_timed: bool = False,
) -> tuple[list[float], list[float]]:
    """``rounds`` samples of each side (ms, or the returned value with ``self_timed``),
    alternating which runs first every round. Returns (subject samples, baseline samples)."""
    samples = rotate(
        [("subject", subject), ("baseline", baseline)],
        rounds,
        before=before,
        self_timed=self_timed,
    )
    return samples["subject"], samples["baseline"]


def quartiles(samples: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); with one sample, that sample three times."""
    if len(samples) < 2:
        value = float(samples[0])
        return value, value, value
    q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, q2, q3


def spread(
    samples: Sequence[float], fmt: str = ".2f", unit: str = "", *, median: bool = True
) -> str:
    """'median M (IQR q1-q3, min-max lo-hi, n=N)' for a printed figure; without the median
    (``median=False``): 'IQR q1-q3, min-max lo-hi, n=N'."""
    q1, middle, q3 = quartiles(samples)
    u = f" {unit}" if unit else ""
    rest = (
        f"IQR {q1:{fmt}}-{q3:{fmt}}{u}, min-max {min(samples):{fmt}}-{max(samples):{fmt}}{u}, "
        f"n={len(samples)}"
    )
    return f"median {middle:{fmt}}{u} ({rest})" if median else rest
