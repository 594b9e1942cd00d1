"""The KPIs of GET /v1/metrics and the dashboard: HTTP requests, errors and latency
percentiles per route (Prometheus counters summed over every process), gateway calls per
model (the LlmCall ledger over a window: every process, cached or failed calls included),
cache hit rate, tokens and cost, queue depths, breaker states, worker heartbeat, readiness
and evaluation outcomes (pass rates with Wilson intervals)."""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal

from django.db.models import Count, Q
from django.utils import timezone

from config import metrics
from evaluation.evals.aggregates import percentiles, wilson
from evaluation.models import BatchEval, EvalRun

MAX_LEDGER_ROWS = 50_000


def _bucket_percentile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """A percentile (ms) from cumulative histogram buckets [(upper bound s, count)], linear
    inside the bucket (as PromQL's histogram_quantile)."""
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return round(prev_bound * 1000, 1)
            span = count - prev_count
            fraction = (rank - prev_count) / span if span else 1.0
            return round((prev_bound + (bound - prev_bound) * fraction) * 1000, 1)
        prev_bound, prev_count = bound, count
    return None


def http_routes() -> list[dict]:
    requests: dict[tuple, dict] = defaultdict(lambda: {"requests": 0, "errors": 0, "status": {}})
    for s in metrics.samples("crucible_http_requests"):
        if not s.name.endswith("_total"):
            continue
        key = (s.labels["method"], s.labels["route"])
        row = requests[key]
        row["requests"] += int(s.value)
        row["status"][s.labels["status"]] = row["status"].get(s.labels["status"], 0) + int(s.value)
        if s.labels["status"].startswith("5"):
            row["errors"] += int(s.value)
    buckets: dict[tuple, list] = defaultdict(list)
    for s in metrics.samples("crucible_http_request_duration_seconds"):
        if s.name.endswith("_bucket"):
            key = (s.labels["method"], s.labels["route"])
            buckets[key].append((float(s.labels["le"]), s.value))
    out = []
    for (method, route), row in sorted(requests.items(), key=lambda kv: -kv[1]["requests"]):
        b = sorted(buckets.get((method, route), []))
        out.append(
            {
                "method": method,
                "route": route,
                **row,
                "error_rate": round(row["errors"] / row["requests"], 4) if row["requests"] else 0,
                "latency_ms": {
                    "p50": _bucket_percentile(b, 0.50),
                    "p95": _bucket_percentile(b, 0.95),
                    "p99": _bucket_percentile(b, 0.99),
                },
            }
        )
    return out


def gateway_models(since) -> dict:
    from billing.models import LlmCall

    rows = list(
        LlmCall.objects.filter(created_at__gte=since)
        .order_by("-created_at")
        .values_list(
            "model", "latency_ms", "cached", "outcome", "prompt_tokens", "completion_tokens", "cost"
        )[:MAX_LEDGER_ROWS]
    )
    per: dict[str, dict] = {}
    latencies: dict[str, list] = defaultdict(list)
    for model, latency, cached, outcome, pt, ct, cost in rows:
        row = per.setdefault(
            model,
            {
                "calls": 0,
                "errors": 0,
                "cached": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "cost": Decimal(0),
            },
        )
        row["calls"] += 1
        row["errors"] += outcome != "ok"
        row["cached"] += bool(cached)
        row["prompt_tokens"] += pt
        row["completion_tokens"] += ct
        row["cost"] += cost
        if not cached:
            latencies[model].append(latency)
    models = {}
    for model, row in per.items():
        models[model] = {
            **row,
            "cost": str(row["cost"]),
            "cache_hit_rate": round(row["cached"] / row["calls"], 4),
            "error_rate": round(row["errors"] / row["calls"], 4),
            "latency_ms": percentiles(latencies[model]),
        }
    calls = sum(r["calls"] for r in per.values())
    return {
        "models": models,
        "calls": calls,
        "errors": sum(r["errors"] for r in per.values()),
        "cache_hit_rate": round(sum(r["cached"] for r in per.values()) / calls, 4)
        if calls
        else None,
        "prompt_tokens": sum(r["prompt_tokens"] for r in per.values()),
        "completion_tokens": sum(r["completion_tokens"] for r in per.values()),
        "cost": str(sum((r["cost"] for r in per.values()), Decimal(0))),
        "truncated": len(rows) >= MAX_LEDGER_ROWS,
    }


def queues() -> dict:
    from config.backpressure import queue_depth, queue_limit

    limit = queue_limit()
    return {
        name: {"depth": queue_depth(name), "limit": limit if name == "long" else None}
        for name in ("control", "long")
    }


def evaluation_outcomes(since) -> dict:
    singles = list(
        EvalRun.objects.filter(
            batch__isnull=True, created_at__gte=since, passed__isnull=False
        ).values_list("passed", flat=True)[:MAX_LEDGER_ROWS]
    )
    recent = list(
        BatchEval.objects.filter(status=BatchEval.Status.COMPLETED)
        .select_related("dataset")
        .order_by("-finished_at")[:10]
    )
    batches = []
    for b in recent:
        overall = (b.aggregates or {}).get("overall", {})
        batches.append(
            {
                "id": str(b.pk),
                "name": b.name,
                "rubric": f"{b.rubric}@{b.rubric_version}",
                "finished_at": b.finished_at.isoformat() if b.finished_at else None,
                "pass_rate": overall.get("pass_rate"),
                "failures": overall.get("failures"),
            }
        )
    counts = BatchEval.objects.aggregate(
        active=Count("pk", filter=Q(status__in=BatchEval.ACTIVE)),
        failed=Count("pk", filter=Q(status=BatchEval.Status.FAILED)),
    )
    return {"single_pass_rate": wilson([bool(p) for p in singles]), "batches": batches, **counts}


def kpis(*, window_minutes: int = 60, readiness: bool = True) -> dict:
    from config.health import readiness as ready_check
    from config.tasks import last_worker_heartbeat
    from jobs import gateway

    now = timezone.now()
    since = now - timedelta(minutes=window_minutes)
    heartbeat = last_worker_heartbeat()
    breakers = gateway.breaker_states()
    health = ready_check() if readiness else {"status": "unknown", "degraded": []}
    degraded = list(health.get("degraded", []))
    degraded += [f"breaker:{slug}" for slug, b in breakers.items() if b["state"] != "closed"]
    if heartbeat is None or (now - heartbeat).total_seconds() > 180:
        degraded.append("workers")
    routes = http_routes()
    return {
        "generated_at": now.isoformat(),
        "window_minutes": window_minutes,
        "health": {
            "status": "degraded" if degraded else "ok",
            "degraded": degraded,
            "checks": health.get("checks", {}),
        },
        "http": {
            "requests": sum(r["requests"] for r in routes),
            "errors": sum(r["errors"] for r in routes),
            "routes": routes,
        },
        "gateway": gateway_models(since),
        "queues": queues(),
        "breakers": breakers,
        "workers": {
            "last_heartbeat": heartbeat.isoformat() if heartbeat else None,
            "age_s": round((now - heartbeat).total_seconds(), 1) if heartbeat else None,
        },
        "evaluation": evaluation_outcomes(since),
    }


def gauges() -> list[tuple[str, str, dict, float]]:
    """Scrape-time gauges for /metrics (registered with config.metrics.register_gauges)."""
    from config.tasks import last_worker_heartbeat
    from jobs import gateway

    rows = []
    for name, q in queues().items():
        if q["depth"] is not None:
            rows.append(("crucible_queue_depth", "Tasks waiting", {"queue": name}, q["depth"]))
    states = {"closed": 0, "half_open": 1, "open": 2}
    for slug, b in gateway.breaker_states().items():
        rows.append(
            (
                "crucible_breaker_state",
                "0 closed, 1 half-open, 2 open",
                {"provider": slug},
                states.get(b["state"], 2),
            )
        )
    heartbeat = last_worker_heartbeat()
    if heartbeat:
        rows.append(
            (
                "crucible_worker_heartbeat_age_seconds",
                "Seconds since the last worker heartbeat",
                {},
                (timezone.now() - heartbeat).total_seconds(),
            )
        )
    return rows
