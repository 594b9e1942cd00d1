"""Prometheus metrics, counted in every web and worker process (prometheus_client's
multiprocess mode: each process writes its values to files under PROMETHEUS_MULTIPROC_DIR,
which settings points at ``<data dir>/prometheus`` before prometheus_client is imported).

- HTTP: ``crucible_http_requests_total{method,route,status}`` and
  ``crucible_http_request_duration_seconds{method,route}`` (config.middleware.MetricsMiddleware;
  the route is the URL pattern, never the raw path, so ids do not explode the label set).
- Gateway: ``crucible_llm_calls_total{provider,model,outcome,cached}``,
  ``crucible_llm_latency_seconds{provider,model}``, ``crucible_llm_tokens_total{model,kind}``,
  ``crucible_llm_cost_dollars_total{model}`` via :func:`observe_llm_call` (the hook apps call
  for each gateway call).
- Scrape-time gauges (queue depths, breaker states, heartbeats) from functions apps register
  with :func:`register_gauges` (config imports no app).

``GET /metrics`` (exposition format) is protected: ``Authorization: Bearer $METRICS_TOKEN`` or a
signed-in user / API token of any role.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

logger = logging.getLogger("crucible.metrics")

if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # settings normally sets it first
    _dir = os.path.join(str(settings.DATA_DIR), "prometheus")
    os.makedirs(_dir, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _dir

from prometheus_client import (  # noqa: E402 - the directory must be set before the import
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily  # noqa: E402

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)

HTTP_REQUESTS = Counter(
    "crucible_http_requests_total", "HTTP requests", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "crucible_http_request_duration_seconds",
    "HTTP request duration",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)
LLM_CALLS = Counter(
    "crucible_llm_calls_total", "Gateway calls", ["provider", "model", "outcome", "cached"]
)
LLM_LATENCY = Histogram(
    "crucible_llm_latency_seconds",
    "Gateway call latency",
    ["provider", "model"],
    buckets=LATENCY_BUCKETS,
)
LLM_TOKENS = Counter("crucible_llm_tokens_total", "Gateway tokens", ["model", "kind"])
LLM_COST = Counter("crucible_llm_cost_dollars_total", "Gateway cost (dollars)", ["model"])

_GAUGES: dict[str, Callable[[], list[tuple[str, str, dict, float]]]] = {}


def observe_request(*, method: str, route: str, status: int, seconds: float) -> None:
    try:
        HTTP_REQUESTS.labels(method, route, str(status)).inc()
        HTTP_LATENCY.labels(method, route).observe(seconds)
    except Exception:  # metrics never break a request
        logger.debug("metrics: request not counted", exc_info=True)


def observe_llm_call(
    *,
    provider: str,
    model: str,
    outcome: str,
    cached: bool,
    latency_ms: float,
    prompt_tokens: int,
    completion_tokens: int,
    cost: float,
) -> None:
    """The gateway hook: one call (cached or not, failed too)."""
    try:
        LLM_CALLS.labels(provider, model, outcome, "true" if cached else "false").inc()
        LLM_LATENCY.labels(provider, model).observe(max(0.0, latency_ms) / 1000)
        LLM_TOKENS.labels(model, "prompt").inc(prompt_tokens)
        LLM_TOKENS.labels(model, "completion").inc(completion_tokens)
        LLM_COST.labels(model).inc(max(0.0, float(cost)))
    except Exception:
        logger.debug("metrics: gateway call not counted", exc_info=True)


def register_gauges(name: str, fn: Callable[[], list[tuple[str, str, dict, float]]]) -> None:
    """``fn()`` -> [(metric name, help, labels, value)], read at scrape time (cheap calls)."""
    _GAUGES[name] = fn


class _ScrapeGauges:
    def collect(self):
        families: dict[str, GaugeMetricFamily] = {}
        for source, fn in list(_GAUGES.items()):
            try:
                rows = fn()
            except Exception:
                logger.warning("metrics: gauges of %s failed", source, exc_info=True)
                continue
            for name, help_, labels, value in rows:
                family = families.get(name)
                if family is None:
                    family = families[name] = GaugeMetricFamily(name, help_, labels=list(labels))
                family.add_metric([str(v) for v in labels.values()], float(value))
        yield from families.values()


def registry(*, with_gauges: bool = True) -> CollectorRegistry:
    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg)
    if with_gauges:
        reg.register(_ScrapeGauges())
    return reg


def samples(name: str) -> list:
    """Every sample of the metric family ``name`` summed over processes (for the JSON KPIs)."""
    for family in registry(with_gauges=False).collect():
        if family.name == name:
            return list(family.samples)
    return []


def _authorised(request: HttpRequest) -> bool:
    token = getattr(settings, "METRICS_TOKEN", "")
    header = request.headers.get("Authorization", "")
    if token and header == f"Bearer {token}":
        return True
    from config.auth import _session_auth, _token_auth

    return bool(_token_auth(request) or _session_auth(request))


def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus exposition for every process; 401 without a token or a session."""
    if not _authorised(request):
        from config.errors import envelope

        response = JsonResponse(
            envelope(
                code="not_authenticated",
                message="Send Authorization: Bearer <METRICS_TOKEN> or an API token.",
                request_id=getattr(request, "request_id", None),
            ),
            status=401,
        )
        response["WWW-Authenticate"] = "Bearer"
        return response
    return HttpResponse(generate_latest(registry()), content_type=CONTENT_TYPE_LATEST)


def mark_process_dead(pid: int | None = None) -> None:
    """Drop a finished process's live gauges (call on worker exit)."""
    multiprocess.mark_process_dead(pid or os.getpid())


def reset_dir() -> int:
    """Delete the metric files of processes that no longer run (prometheus_client names each
    file after its process: ``counter_<pid>.db``), since multiprocess counters of dead
    processes are otherwise summed in forever. A running process's files stay: deleting them
    would hide everything it counts from then on (it keeps writing to the unlinked file).
    The demo supervisor calls this before it starts its processes. Returns the files deleted."""
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    deleted = 0
    for name in os.listdir(folder):
        stem, _, pid = name.removesuffix(".db").rpartition("_")
        if not name.endswith(".db") or not stem or not pid.isdigit() or _alive(int(pid)):
            continue
        os.remove(os.path.join(folder, name))
        deleted += 1
    return deleted


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
