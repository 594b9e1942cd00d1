"""Issue 17, metrics: /v1/metrics (JSON KPIs) and /metrics (Prometheus exposition, every
process's counters through multiprocess mode) reflect the requests and gateway calls made in
the test; /metrics is protected; tracing stays off without an OTLP endpoint."""

# ruff: noqa: F811  (fixtures imported from other modules are redefined as arguments)
from __future__ import annotations

import os
import re

import pytest
from django.test import Client

from config import metrics, tracing
from config.roles import Role
from tests.conftest import assert_envelope
from tests.jobs.openai_server import fast_gateway, loopback_model, openai_server  # noqa: F401


def _counter(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _scrape(client: Client, token: str = "") -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return response.content.decode()


def test_metrics_reflect_requests_and_gateway_calls(api_as, loopback_model, fast_gateway, settings):
    settings.METRICS_TOKEN = "scrape-secret"
    engineer = api_as(Role.ENGINEER, scheme="Bearer")
    scraper = Client()
    before = _scrape(scraper, "scrape-secret")
    route = dict(method="POST", route="/v1/chat", status="200")
    chat_before = _counter(before, "crucible_http_requests_total", **route)
    llm_before = _counter(before, "crucible_llm_calls_total", model=loopback_model.key)

    for i in range(3):
        response = engineer.post(
            "/v1/chat", json={"model": loopback_model.key, "prompt": f"hello {i}"}
        )
        assert response.status_code == 200, response.content
    engineer.get("/v1/models")

    after = _scrape(scraper, "scrape-secret")
    assert _counter(after, "crucible_http_requests_total", **route) == chat_before + 3
    assert _counter(after, "crucible_llm_calls_total", model=loopback_model.key) == llm_before + 3
    assert _counter(after, "crucible_llm_tokens_total", model=loopback_model.key) > 0
    assert "crucible_http_request_duration_seconds_bucket" in after
    assert f'crucible_breaker_state{{provider="{loopback_model.provider.slug}"}} 0.0' in after

    body = engineer.get("/v1/metrics").json()
    chat = next(r for r in body["http"]["routes"] if r["route"] == "/v1/chat")
    assert chat["requests"] >= 3 and chat["latency_ms"]["p95"] is not None
    model = body["gateway"]["models"][loopback_model.key]
    assert model["calls"] == 3 and model["errors"] == 0 and model["latency_ms"]["n"] == 3
    assert float(model["cost"]) > 0 and model["cache_hit_rate"] == 0
    assert body["breakers"][loopback_model.provider.slug]["state"] == "closed"
    assert set(body["queues"]) == {"control", "long"}
    assert body["health"]["status"] in ("ok", "degraded")
    assert "single_pass_rate" in body["evaluation"]

    # A repeated prompt is a cache hit: the hit rate moves.
    engineer.post("/v1/chat", json={"model": loopback_model.key, "prompt": "hello 0"})
    model = engineer.get("/v1/metrics").json()["gateway"]["models"][loopback_model.key]
    assert model["calls"] == 4 and model["cached"] == 1 and model["cache_hit_rate"] == 0.25


def test_metrics_endpoint_is_protected(api_as, db, settings):
    settings.METRICS_TOKEN = "right"
    response = Client().get("/metrics")
    assert_envelope(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"] == "Bearer"
    assert Client().get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    viewer = api_as(Role.VIEWER)
    assert Client().get("/metrics", headers=viewer._headers).status_code == 200


def test_v1_metrics_needs_sign_in(anon_api, api_as):
    assert_envelope(anon_api.get("/v1/metrics"), 401)
    assert api_as(Role.VIEWER).get("/v1/metrics").status_code == 200


def test_dashboard_names_degraded_parts(db, monkeypatch):
    from config import health
    from tests.factories import UserFactory

    client = Client()
    client.force_login(UserFactory(role=Role.VIEWER))

    def down() -> str:
        raise ConnectionError("Redis is not answering")

    monkeypatch.setitem(health.CHECKS, "cache", down)
    page = client.get("/evals/dashboard/")
    assert page.status_code == 200
    assert b'data-health="degraded"' in page.content and b"cache" in page.content
    assert b"chart.umd.min.js" in page.content


def test_bucket_percentile_interpolates():
    from evaluation.evals.kpis import _bucket_percentile

    buckets = [(0.01, 50.0), (0.1, 90.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert _bucket_percentile(buckets, 0.5) == 10.0
    assert _bucket_percentile(buckets, 0.95) == pytest.approx(550.0)
    assert _bucket_percentile([], 0.5) is None


def test_tracing_is_off_without_an_endpoint(monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert tracing.enabled() is False and tracing.setup() is False
    assert tracing.annotate("abc") is None


def test_tracing_exports_request_id_on_the_span(monkeypatch):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("request") as span:
        monkeypatch.setattr(trace, "get_current_span", lambda: span)
        trace_id = tracing.annotate("req-123")
    (finished,) = exporter.get_finished_spans()
    assert finished.attributes["crucible.request_id"] == "req-123"
    assert trace_id == format(finished.context.trace_id, "032x")


def test_multiprocess_directory_is_under_the_data_dir(settings):
    import os

    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == settings.PROMETHEUS_MULTIPROC_DIR
    assert metrics.registry() is not None


def test_reset_dir_deletes_the_metric_files_of_dead_processes_only(tmp_path, monkeypatch):
    """The demo supervisor clears the multiprocess folder before it starts its processes, so
    counters of processes from earlier runs are not summed in forever; a live process's files
    stay (deleting them would hide what it counts from then on)."""
    import subprocess
    import sys

    from config import metrics

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    (tmp_path / f"counter_{dead_pid}.db").write_bytes(b"x")
    (tmp_path / f"histogram_{dead_pid}.db").write_bytes(b"x")
    (tmp_path / f"counter_{os.getpid()}.db").write_bytes(b"x")
    (tmp_path / "README").write_text("kept")
    assert metrics.reset_dir() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README", f"counter_{os.getpid()}.db"]
