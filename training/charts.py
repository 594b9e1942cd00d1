"""Loss and learning-rate series for the job charts, downsampled for drawing.

A chart is at most ~1,000 pixels wide, so a job with a million logged steps is reduced to
about ``points`` points per series with largest-triangle-three-buckets (LTTB, Steinarsson
2013), which keeps the curve's shape, its spikes included.

Reading a million rows into Python costs more than the whole response may, so long
histories are first reduced in the database to the minimum and the maximum of each of
``MINMAX_RATIO * points / 2`` step buckets (range aggregates on the index, portable SQL),
and LTTB runs on those candidates: the MinMaxLTTB scheme of Van Der Donckt et al. (2023),
also used by the ``tsdownsample`` package. Neither ``tsdownsample`` nor ``lttb`` is
installed here, and the part that matters for speed is the SQL pass that no Python library
does for us; the LTTB step over a few thousand candidates is the short numpy function below.

Downsampled series are cached under a key that changes with each new step (and each
relaunch), so a page load or a second viewer reuses the work; live pages only fetch the
steps logged since their last look (``after``).
"""

from __future__ import annotations

import numpy as np
from django.core.cache import cache
from django.db import connection

from training.models import MetricPoint, TrainingJob

DEFAULT_POINTS = 1000
MAX_POINTS = 5000
MINMAX_RATIO = 4  # candidates per output point when preselecting in the database
CACHE_S = 24 * 3600
ACTIVE_CACHE_S = 3600


def lttb(x: np.ndarray, y: np.ndarray, n_out: int) -> np.ndarray:
    """Indices of the ``n_out`` points LTTB keeps (first and last always kept).

    ``x`` must be sorted. Returns all indices when there are no more than ``n_out`` points.
    """
    n = len(x)
    if n_out >= n or n_out < 3:
        return np.arange(n) if n_out >= n else np.array([0, n - 1][: max(n_out, 0)])
    # Bucket edges over the inner points (1 .. n-2), as in the reference implementation.
    edges = np.linspace(1, n - 1, n_out - 1).astype(np.int64)
    keep = np.empty(n_out, dtype=np.int64)
    keep[0], keep[-1] = 0, n - 1
    a = 0
    for i in range(n_out - 2):
        lo, hi = edges[i], max(edges[i + 1], edges[i] + 1)
        # The average of the next bucket (the last point for the last bucket).
        if i + 2 < len(edges):
            nlo, nhi = edges[i + 1], max(edges[i + 2], edges[i + 1] + 1)
            cx, cy = x[nlo:nhi].mean(), y[nlo:nhi].mean()
        else:
            cx, cy = x[-1], y[-1]
        ax, ay = x[a], y[a]
        area = np.abs((ax - cx) * (y[lo:hi] - ay) - (ax - x[lo:hi]) * (cy - ay))
        a = lo + int(np.argmax(area))
        keep[i + 1] = a
    return keep


def _downsample(steps: np.ndarray, values: np.ndarray, n_out: int) -> list[list[float]]:
    mask = ~np.isnan(values)
    steps, values = steps[mask], values[mask]
    if len(steps) == 0:
        return []
    keep = lttb(steps, values, n_out)
    return [[_num(steps[i]), float(values[i])] for i in keep]


def _num(value) -> float | int:
    value = float(value)
    return int(value) if value.is_integer() else round(value, 2)


def _raw_rows(queryset) -> tuple[np.ndarray, ...]:
    rows = list(queryset.values_list("step", "train_loss", "val_loss", "learning_rate"))
    if not rows:
        empty = np.empty(0)
        return empty, empty, empty, empty
    array = np.array(rows, dtype=float)  # None becomes nan
    return array[:, 0], array[:, 1], array[:, 2], array[:, 3]


# Buckets per statement: SQLite allows 500 terms in a compound SELECT.
BUCKETS_PER_QUERY = 500


def _bucket_rows(job_id, *, first: int, last: int, buckets: int) -> list[tuple]:
    """Per step bucket: (bucket, first step, last step, min and max train loss, min and max
    validation loss, evaluations, mean learning rate, points).

    Each bucket is its own range condition on the (job, step) index, joined with UNION ALL
    (a few statements for all buckets): the database streams each range in index order. A
    GROUP BY on a computed bucket number reads the same rows but sorts them all first,
    which measured 2-3x slower on SQLite (bench/bench_dashboard.py).
    """
    meta = MetricPoint._meta
    table = connection.ops.quote_name(meta.db_table)
    job_column = connection.ops.quote_name(meta.get_field("job").column)
    job_value = meta.get_field("job").target_field.get_db_prep_value(job_id, connection)
    span = last - first + 1
    edges = [first + span * i // buckets for i in range(buckets + 1)]
    aggregates = (
        "MIN(step), MAX(step), MIN(train_loss), MAX(train_loss), MIN(val_loss), "
        "MAX(val_loss), COUNT(val_loss), AVG(learning_rate), COUNT(*)"
    )
    # Only identifiers from the model's metadata and bucket numbers (ints) are formatted
    # in; the job and the step bounds are parameters.
    where = f"FROM {table} WHERE {job_column} = %s AND step >= %s AND step < %s"
    rows: list[tuple] = []
    with connection.cursor() as cursor:
        for start in range(0, buckets, BUCKETS_PER_QUERY):
            chunk = range(start, min(start + BUCKETS_PER_QUERY, buckets))
            sql = " UNION ALL ".join(f"SELECT {int(i)}, {aggregates} {where}" for i in chunk)
            params: list = []
            for i in chunk:
                params += [job_value, edges[i], edges[i + 1]]
            cursor.execute(sql, params)
            rows += [row for row in cursor.fetchall() if row[9]]  # skip empty buckets
    rows.sort(key=lambda row: row[0])
    return rows


def _minmax_candidates(job_id, *, first: int, last: int, buckets: int) -> tuple[np.ndarray, ...]:
    """The MinMax preselection: per bucket the min and max of each series (at the
    bucket's mid step), the mean learning rate, and the number of points read."""
    rows = _bucket_rows(job_id, first=first, last=last, buckets=buckets)
    array = np.array([row[1:] for row in rows], dtype=float)
    mid = (array[:, 0] + array[:, 1]) / 2
    mid[0], mid[-1] = array[0, 0], array[-1, 1]  # the curve starts and ends where it did
    steps2 = np.repeat(mid, 2)
    train = np.column_stack([array[:, 2], array[:, 3]]).ravel()
    # One evaluation in a bucket is a single point; more become that bucket's min and max.
    one = array[:, 6] == 1
    vmax = np.where(one, np.nan, array[:, 5])
    val = np.column_stack([array[:, 4], vmax]).ravel()
    return steps2, train, val, mid, array[:, 7], int(array[:, 8].sum())


def chart_series(job: TrainingJob, *, points: int = DEFAULT_POINTS, after: int | None = None):
    """The chart's JSON: ``train``, ``val`` and ``lr`` as ``[step, value]`` pairs.

    ``after``: only the raw points logged after that step (live updates append them).
    """
    points = max(10, min(MAX_POINTS, int(points)))
    base = {
        "job": str(job.pk),
        "status": job.status,
        "active": job.is_active,
        "total_steps": job.total_steps,
    }
    metrics = MetricPoint.objects.filter(job_id=job.pk).order_by("step")
    if after is not None:
        steps, train, val, lr = _raw_rows(metrics.filter(step__gt=after)[: MAX_POINTS + 1])
        truncated = len(steps) > MAX_POINTS
        series = {
            "train": _downsample(steps, train, len(steps)),
            "val": _downsample(steps, val, len(steps)),
            "lr": _downsample(steps, lr, len(steps)),
        }
        last = int(steps[-1]) if len(steps) else after
        return {**base, "after": after, "last_step": last, "reload": truncated, **series}

    # The first and last step: two seeks in the (job, step) index, no row read (one query
    # with MIN and MAX together would scan the job's whole index range on SQLite).
    steps_only = MetricPoint.objects.filter(job_id=job.pk).values_list("step", flat=True)
    first = steps_only.order_by("step").first()
    last = steps_only.order_by("-step").first() or 0
    # One step logs one point at most, so the step span bounds the number of points.
    # The cache key changes with every new step and every relaunch; a finished job's
    # history never changes again.
    finished = job.completed_at.timestamp() if job.completed_at else 0
    key = (
        f"training-chart:{job.pk}:{job.status}:{job.attempt}:{first}:{last}:{finished:.3f}:{points}"
    )
    cached = cache.get(key)
    if cached is not None:
        return {**cached, **base}

    if first is None or last - first + 1 <= MINMAX_RATIO * points:
        steps, train, val, lr = _raw_rows(metrics)
        lr_steps, n = steps, len(steps)
    else:
        buckets = MINMAX_RATIO * points // 2
        steps, train, val, lr_steps, lr, n = _minmax_candidates(
            job.pk, first=first, last=last, buckets=buckets
        )
    result = {
        "points_logged": n,
        "downsampled": n > points,
        "last_step": last,
        "train": _downsample(steps, train, points),
        "val": _downsample(steps, val, points),
        "lr": _downsample(lr_steps, lr, points),
    }
    cache.set(key, result, CACHE_S if job.is_terminal else ACTIVE_CACHE_S)
    return {**result, **base}
