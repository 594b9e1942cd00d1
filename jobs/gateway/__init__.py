"""The model gateway: every LLM call in Crucible goes through here.

    from jobs import gateway

    result = gateway.chat(model="offline/smollm2-135m-instruct",
                          request={"messages": [...], "max_tokens": 64},
                          caller=gateway.Caller(user=user, feature="judge", subject=run))
    result.response, result.text, result.meta

    for chunk in gateway.chat_stream(model=..., request=..., caller=...):  # streamed
        ...  # OpenAI chat.completion.chunk dicts; the last carries usage

Providers (jobs/gateway/providers.py), retries with backoff and full jitter honouring
Retry-After, a circuit breaker per provider (breaker.py), shared rate limits (ratelimit.py),
an exact-match cache (cache.py), budget reservations and the LlmCall ledger (billing).
"""

from jobs.gateway.breaker import breaker_reset, breaker_state
from jobs.gateway.client import (
    Caller,
    CallMeta,
    ChatStream,
    Result,
    call_cost,
    calls_recover,
    chat,
    chat_stream,
    embed,
    models,
    reset_caches,
    settings_effective,
)
from jobs.gateway.errors import (
    BudgetExceeded,
    CircuitOpen,
    DeadlineExceeded,
    GatewayError,
    InvalidRequest,
    ModelDisabled,
    ModelUnpriced,
    ProviderError,
    RateLimited,
    UnknownModel,
)
from jobs.gateway.providers import PROVIDER_CLASSES, ProviderCallError, provider_for


def breaker_states() -> dict[str, dict]:
    """Each provider's breaker: {"state": closed|open|half_open, "retry_after_s", "failures"}."""
    from jobs.models import Provider

    return {slug: breaker_state(slug) for slug in Provider.objects.values_list("slug", flat=True)}


__all__ = [
    "PROVIDER_CLASSES",
    "BudgetExceeded",
    "CallMeta",
    "Caller",
    "ChatStream",
    "CircuitOpen",
    "DeadlineExceeded",
    "GatewayError",
    "InvalidRequest",
    "ModelDisabled",
    "ModelUnpriced",
    "ProviderCallError",
    "ProviderError",
    "RateLimited",
    "Result",
    "UnknownModel",
    "breaker_reset",
    "breaker_states",
    "call_cost",
    "calls_recover",
    "chat",
    "chat_stream",
    "embed",
    "models",
    "provider_for",
    "reset_caches",
    "settings_effective",
]
