"""Wiring done once per process from EvaluationConfig.ready()."""

from __future__ import annotations

_connected = False


def _llm_call_settled(sender, call, **kwargs) -> None:
    """The gateway's metrics hook: every settled ledger row (one per gateway call, cached or
    failed) goes to config.metrics in the process that settled it."""
    from config import metrics

    instance = call

    metrics.observe_llm_call(
        provider=instance.provider,
        model=instance.model,
        outcome=instance.outcome if instance.outcome == "ok" else instance.outcome[:40],
        cached=instance.cached,
        latency_ms=instance.latency_ms or 0.0,
        prompt_tokens=instance.prompt_tokens,
        completion_tokens=instance.completion_tokens,
        cost=float(instance.cost or 0),
    )


def connect() -> None:
    global _connected
    if _connected:
        return
    _connected = True
    from billing.models import LlmCall
    from billing.signals import llm_call_settled
    from config import metrics, tracing
    from evaluation.evals import batch, kpis

    batch.register()  # the 'eval' kind of batch job: batch evaluations run on the batch engine

    llm_call_settled.connect(_llm_call_settled, sender=LlmCall, dispatch_uid="crucible-llm-metrics")
    metrics.register_gauges("evaluation", kpis.gauges)
    tracing.setup()
    try:
        from jobs.public_api import public_api
    except ImportError:  # a checkout without the public API
        return
    from evaluation.evals.api import router

    public_api.add_router("", router)
