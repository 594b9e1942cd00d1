"""OpenTelemetry hooks: Django requests, Celery tasks and the gateway's HTTP calls (httpx,
which the openai SDK uses), exported over OTLP/HTTP only when OTEL_EXPORTER_OTLP_ENDPOINT is
set; without it nothing is instrumented and nothing is exported. The request id
(X-Request-ID) is the correlation key: config.middleware.MetricsMiddleware puts it on the
request's span as ``crucible.request_id`` and the trace id into the log context.

Called once per process from an AppConfig.ready() (before Django builds its middleware
chain, so the Django instrumentation's middleware is in place); Celery workers instrument in
``worker_process_init`` (after the fork, as the OpenTelemetry docs require).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("crucible.tracing")
_done = False


def enabled() -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def _provider(service: str):
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(
        resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)})
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def setup(service: str = "crucible") -> bool:
    """Instrument this process when an OTLP endpoint is configured; True when it did."""
    global _done
    if _done or not enabled():
        return False
    _done = True
    try:
        _provider(service)
        from opentelemetry.instrumentation.django import DjangoInstrumentor
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        DjangoInstrumentor().instrument()
        HTTPXClientInstrumentor().instrument()
        from celery.signals import worker_process_init

        worker_process_init.connect(_instrument_celery, weak=False)
    except Exception:  # tracing must never stop the service
        logger.exception("OpenTelemetry instrumentation failed; running without tracing")
        return False
    logger.info("OpenTelemetry: exporting to %s", os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"])
    return True


def _instrument_celery(*args, **kwargs) -> None:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    CeleryInstrumentor().instrument()


def annotate(request_id: str) -> str | None:
    """Put the request id on the current span; returns the trace id (hex) when recording."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    span = trace.get_current_span()
    if not span.is_recording():
        return None
    span.set_attribute("crucible.request_id", request_id)
    return format(span.get_span_context().trace_id, "032x")
