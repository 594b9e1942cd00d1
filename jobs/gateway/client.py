"""The gateway's calls: resolve the model, cache, breaker, rate limits, budget reservation,
retries, ledger. ``chat`` and ``embed`` are re-exported by ``jobs.gateway``."""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
from django.conf import settings
from django.db.models.signals import post_delete, post_save

from billing import services as billing
from config.logging import current_request_id
from jobs.gateway import cache as response_cache
from jobs.gateway import ratelimit
from jobs.gateway.breaker import Breaker
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
from jobs.gateway.providers import (
    BaseProvider,
    ProviderCallError,
    ProviderResponse,
    estimate_prompt_tokens,
    estimate_tokens,
    provider_for,
)
from jobs.models import GatewaySettings, Provider, RegisteredModel

logger = logging.getLogger("crucible.gateway")

MILLION = Decimal(1_000_000)
NANO = Decimal("0.00000001")
FEATURES = ("judge", "playground", "chat", "batch", "rag", "eval", "test", "other")

# Patched by the tests to record waits instead of sleeping; the clock the deadline uses.
sleep = time.sleep
clock = time.monotonic


@dataclass
class Caller:
    """Who calls and for what: the ledger's user, feature and subject (any model instance)."""

    user: Any = None
    feature: str = "other"
    subject: Any = None
    attribution: str = ""


@dataclass
class CallMeta:
    provider: str
    model: str
    latency_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Decimal = Decimal(0)
    cached: bool = False
    attempts: int = 0
    request_id: str = ""
    ledger_id: int | None = None
    cache_key: str = ""
    waits: list[float] = field(default_factory=list)


@dataclass
class Result:
    response: dict
    meta: CallMeta
    raw: str = ""  # the response JSON exactly as stored in the cache

    @property
    def text(self) -> str:
        try:
            return self.response["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            return ""

    @property
    def embeddings(self) -> list[list[float]]:
        return [row["embedding"] for row in self.response.get("data") or []]


# --- Settings -----------------------------------------------------------------------------------


SETTINGS_TTL_S = 2.0
_settings_cache: tuple[float, int, dict] | None = None


def settings_effective() -> dict:
    """GatewaySettings (the settings page) with environment variables winning; kept for
    SETTINGS_TTL_S in each process (a save in this process drops it at once)."""
    global _settings_cache
    now = time.monotonic()
    cached = _settings_cache
    if cached and cached[0] > now and cached[1] == GatewaySettings.version:
        return cached[2]
    version = GatewaySettings.version
    values = GatewaySettings.load().effective()
    _settings_cache = (now + SETTINGS_TTL_S, version, values)
    return values


# --- Models -------------------------------------------------------------------------------------


def models(capability: str | None = None, enabled_only: bool = True):
    """The registered models (a queryset), optionally only those with ``capability``."""
    qs = RegisteredModel.objects.select_related("provider")
    if enabled_only:
        qs = qs.enabled()
    if capability:
        qs = qs.with_capability(capability)
    return qs


MODEL_TTL_S = 2.0
_model_cache: dict[str, tuple[float, int, RegisteredModel]] = {}
_model_version = 0


def _registry_changed(**kwargs) -> None:
    """A provider or model saved or deleted in this process: drop the cached rows."""
    global _model_version
    _model_version += 1
    _model_cache.clear()


def reset_caches() -> None:
    """Drop this process's cached settings and registry rows (after a queryset ``update()``
    of providers or models, which sends no signal)."""
    global _settings_cache
    _settings_cache = None
    _registry_changed()


for _sender in (RegisteredModel, Provider):
    post_save.connect(_registry_changed, sender=_sender, dispatch_uid=f"gw-{_sender.__name__}")
    post_delete.connect(_registry_changed, sender=_sender, dispatch_uid=f"gw-d-{_sender.__name__}")


def _lookup(key: str) -> RegisteredModel | None:
    """The model row with its provider, kept MODEL_TTL_S per process (another process's edit
    shows within that time; one in this process at once)."""
    now = time.monotonic()
    cached = _model_cache.get(key)
    if cached and cached[0] > now and cached[1] == _model_version:
        return cached[2]
    version = _model_version
    model = RegisteredModel.objects.select_related("provider").filter(key=key).first()
    if model is not None:
        _model_cache[key] = (now + MODEL_TTL_S, version, model)
    return model


def _resolve(key: str, capability: str) -> RegisteredModel:
    model = _lookup(key)
    if model is None:
        raise UnknownModel(
            f"No model '{key}' in the registry; registered models are listed at "
            "GET /api/v1/models and on the gateway settings page.",
            details={"model": key},
        )
    if not model.has_capability(capability):
        raise InvalidRequest(
            f"Model '{key}' does not do {capability} (it does {', '.join(model.capabilities)}).",
            details={"model": key, "capability": capability},
        )
    if not model.enabled or not model.provider.enabled:
        what = "model" if not model.enabled else f"provider '{model.provider.slug}'"
        raise ModelDisabled(
            f"Model '{key}' cannot be used: its {what} is disabled by an admin.",
            details={"model": key},
        )
    if not model.is_priced and not model.allow_unpriced:
        raise ModelUnpriced(
            f"Model '{key}' has no price, so its spend cannot be held to the budget; an admin "
            "can enter its prices or allow it unpriced on the gateway settings page.",
            details={"model": key},
        )
    return model


def call_cost(model: RegisteredModel, prompt_tokens: int, completion_tokens: int) -> Decimal:
    if not model.is_priced:
        return Decimal(0)
    cost = (
        Decimal(prompt_tokens) * model.price_input_per_m
        + Decimal(completion_tokens) * model.price_output_per_m
    ) / MILLION
    return cost.quantize(NANO)


# --- Retries ------------------------------------------------------------------------------------


def backoff_delay(attempt: int, *, base: float, cap: float, retry_after: float | None) -> float:
    """Exponential backoff with full jitter (uniform in [0, min(cap, base * 2**attempt)]),
    never shorter than the server's latest Retry-After."""
    delay = random.uniform(0, min(cap, base * 2 ** (attempt - 1)))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


# config/retry.py (tenacity) was considered: the gateway also needs the breaker's bookkeeping
# and fail-fast between attempts, a log line per attempt, each attempt's timeout cut to the
# time left, and to stop (not sleep past) when the next wait would cross the deadline; a loop
# over backoff_delay keeps all of that in one readable place.
def _with_retries(
    *,
    adapter: BaseProvider,
    model: RegisteredModel,
    operation: str,
    payload: Any,
    conf: dict,
    deadline_at: float,
    breaker: Breaker,
    meta: CallMeta,
) -> ProviderResponse:
    attempts = max(1, int(conf["retry_attempts"]))
    per_request = float(model.provider.timeout_s or conf["timeout_s"])
    secrets = adapter.secrets()
    last: ProviderCallError | None = None
    for attempt in range(1, attempts + 1):
        # The first attempt was cleared by the caller's check; retries look again.
        wait = breaker.before_call() if attempt > 1 else None
        if wait is not None:
            raise CircuitOpen(
                f"Provider '{model.provider.slug}' is failing; calls to it are paused "
                f"for {wait:.1f}s.",
                retry_after=wait,
                transient=True,
                details={"provider": model.provider.slug},
            )
        remaining = deadline_at - clock()
        if remaining <= 0:
            break
        meta.attempts = attempt
        started = clock()
        try:
            if operation == "chat":
                out = adapter.chat(
                    model, payload, timeout=min(per_request, remaining), request_id=meta.request_id
                )
            else:
                out = adapter.embed(
                    model, payload, timeout=min(per_request, remaining), request_id=meta.request_id
                )
        except ProviderCallError as exc:
            last = exc
            took = (clock() - started) * 1000
            logger.log(
                logging.WARNING if exc.transient else logging.ERROR,
                "gateway %s %s attempt %d/%d failed in %.0f ms: %s%s",
                operation,
                model.key,
                attempt,
                attempts,
                took,
                _scrub(exc.message, secrets),
                f" (retry after {exc.retry_after:.2f}s)" if exc.retry_after is not None else "",
                extra={"request_id": meta.request_id},
            )
            if not exc.transient:
                breaker.success()  # it answered: the provider is up
                raise ProviderError(
                    _scrub(exc.message, secrets),
                    code=_permanent_code(exc.status),
                    details={"provider": model.provider.slug, "status": exc.status},
                ) from None
            if breaker.failure():
                logger.warning(
                    "gateway breaker of provider %s opened",
                    model.provider.slug,
                    extra={"request_id": meta.request_id},
                )
            if attempt == attempts:
                break
            delay = backoff_delay(
                attempt,
                base=float(conf["backoff_base_s"]),
                cap=float(conf["backoff_cap_s"]),
                retry_after=exc.retry_after,
            )
            if clock() + delay >= deadline_at:
                raise DeadlineExceeded(
                    f"{model.key}: {_scrub(exc.message, secrets)}; the next try (in "
                    f"{delay:.1f}s) would pass the call's deadline.",
                    transient=True,
                    retry_after=exc.retry_after,
                    details={"provider": model.provider.slug, "attempts": attempt},
                ) from None
            meta.waits.append(delay)
            sleep(delay)
            continue
        breaker.success()
        logger.info(
            "gateway %s %s attempt %d ok in %.0f ms",
            operation,
            model.key,
            attempt,
            (clock() - started) * 1000,
            extra={"request_id": meta.request_id},
        )
        return out
    if last is None:
        raise DeadlineExceeded(
            f"{model.key}: no time left within the call's deadline.",
            transient=True,
            details={"provider": model.provider.slug},
        )
    raise ProviderError(
        f"{model.key} failed {meta.attempts} times: {_scrub(last.message, secrets)}",
        code="provider_unavailable",
        transient=True,
        retry_after=last.retry_after,
        details={"provider": model.provider.slug, "attempts": meta.attempts, "status": last.status},
    )


def _permanent_code(status: int | None) -> str:
    return {
        400: "provider_bad_request",
        401: "provider_unauthorized",
        403: "provider_forbidden",
        404: "provider_model_not_found",
        413: "provider_request_too_large",
        422: "provider_bad_request",
    }.get(status or 0, "provider_error")


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "****")
    return text


# --- Rate limits --------------------------------------------------------------------------------


def _rate_limit(
    model: RegisteredModel, *, tokens: int, interactive: bool, deadline_at: float, meta: CallMeta
) -> None:
    limits = ratelimit.limits_for(model.provider, model)
    if not limits:
        return
    while True:
        wait = ratelimit.try_acquire(limits, tokens=tokens)
        if wait is None:
            return
        if interactive:
            raise RateLimited(
                f"{model.key} is at its rate limit; try again in {wait:.1f}s.",
                retry_after=wait,
                transient=True,
                details={"model": model.key},
            )
        if clock() + wait >= deadline_at:
            raise DeadlineExceeded(
                f"{model.key} stayed at its rate limit past the call's deadline.",
                transient=True,
                retry_after=wait,
                details={"model": model.key},
            )
        # Backpressure: a batch caller waits for room instead of failing.
        meta.waits.append(wait)
        sleep(wait)


# --- The calls ----------------------------------------------------------------------------------


def _call(
    *,
    operation: str,
    model_key: str,
    body: dict,
    payload: Any,
    caller: Caller | None,
    interactive: bool,
    cache: str,
    run_index: int | None,
    deadline_s: float | None,
    max_tokens: int,
) -> Result:
    started = time.perf_counter()
    caller = caller or Caller()
    if cache not in response_cache.MODES:
        raise InvalidRequest(f"cache must be one of {', '.join(response_cache.MODES)}.")
    request_id = current_request_id() or uuid.uuid4().hex
    meta = CallMeta(provider="", model=model_key, request_id=request_id)
    reservation = None
    outcome = "ok"
    try:
        model = _resolve(model_key, "chat" if operation == "chat" else "embeddings")
        meta.provider = model.provider.slug
        conf = settings_effective()
        deadline_at = clock() + float(deadline_s if deadline_s is not None else conf["deadline_s"])
        key = response_cache.cache_key(
            provider=model.provider.slug,
            remote_id=model.remote_id,
            revision=model.revision,
            operation=operation,
            body=body,
            run_index=run_index,
        )
        meta.cache_key = key
        if cache == "default":
            hit = response_cache.lookup(key)
            if hit is not None:
                meta.cached = True
                meta.prompt_tokens = hit["prompt_tokens"]
                meta.completion_tokens = hit["completion_tokens"]
                return Result(orjson.loads(hit["raw"]), meta, hit["raw"])

        adapter = provider_for(model.provider)
        if operation == "chat":
            # The provider's count (the exact tokenizer offline) where the price makes it
            # matter; the byte heuristic otherwise (it also feeds the token rate limits).
            paid = model.is_priced and (model.price_input_per_m or model.price_output_per_m)
            prompt_est = (
                adapter.prompt_tokens(model, body) if paid else estimate_prompt_tokens(body)
            )
        else:
            prompt_est = sum(estimate_tokens(text) for text in payload)
        worst = call_cost(model, prompt_est, max_tokens)

        breaker = Breaker(
            model.provider.slug,
            threshold=int(conf["breaker_failure_threshold"]),
            reset_s=float(conf["breaker_reset_s"]),
        )
        wait = breaker.before_call()
        if wait is not None:
            raise CircuitOpen(
                f"Provider '{model.provider.slug}' is failing; calls to it are paused for "
                f"{wait:.1f}s.",
                retry_after=wait,
                transient=True,
                details={"provider": model.provider.slug},
            )
        _rate_limit(
            model,
            tokens=prompt_est + max_tokens,
            interactive=interactive,
            deadline_at=deadline_at,
            meta=meta,
        )
        if worst > 0:
            try:
                reservation = billing.llm_budget_reserve(
                    amount=worst,
                    model=model.key,
                    feature=caller.feature,
                    request_id=request_id,
                    ttl_s=max(60.0, deadline_at - clock() + 60.0),
                )
            except billing.BudgetExceeded as exc:
                raise BudgetExceeded(exc.message, details=exc.details) from None
        out = _with_retries(
            adapter=adapter,
            model=model,
            operation=operation,
            payload=payload,
            conf=conf,
            deadline_at=deadline_at,
            breaker=breaker,
            meta=meta,
        )
        meta.prompt_tokens, meta.completion_tokens = out.prompt_tokens, out.completion_tokens
        meta.cost = call_cost(model, out.prompt_tokens, out.completion_tokens)
        raw = orjson.dumps(out.body).decode()
        if cache != "no-store":
            response_cache.store(
                key,
                raw=raw,
                prompt_tokens=out.prompt_tokens,
                completion_tokens=out.completion_tokens,
                ttl_s=int(conf["cache_ttl_s"]),
            )
        return Result(out.body, meta, raw)
    except GatewayError as exc:
        outcome = f"error:{exc.code}"
        raise
    except Exception as exc:
        outcome = f"error:{type(exc).__name__}"
        raise
    finally:
        meta.latency_ms = (time.perf_counter() - started) * 1000
        if meta.provider:  # a model that does not resolve is a bad input: nothing recorded
            _record(meta, caller, operation, outcome, reservation)


def _record(meta: CallMeta, caller: Caller, operation: str, outcome: str, reservation) -> None:
    """The call's ledger row; its reservation settles in the same transaction."""
    try:
        call = billing.llm_call_record(
            reservation=reservation,
            user=caller.user,
            feature=caller.feature,
            subject=caller.subject,
            attribution=caller.attribution,
            provider=meta.provider,
            model=meta.model,
            operation=operation,
            prompt_tokens=meta.prompt_tokens,
            completion_tokens=meta.completion_tokens,
            cost=meta.cost,
            latency_ms=meta.latency_ms,
            attempts=meta.attempts,
            cached=meta.cached,
            outcome=outcome,
            request_id=meta.request_id,
        )
        meta.ledger_id = call.pk
    except Exception:
        # The ledger must not hide the call's own outcome; release the hold (or it expires).
        logger.exception("gateway ledger write failed", extra={"request_id": meta.request_id})
        try:
            billing.llm_budget_release(reservation=reservation)
        except Exception:
            logger.exception("gateway reservation release failed")


def _check_body(request: dict) -> dict:
    if not isinstance(request, dict):
        raise InvalidRequest("request must be an object (an OpenAI chat body).")
    for forbidden in ("model", "stream"):
        if forbidden in request:
            raise InvalidRequest(
                f"Leave '{forbidden}' out of the request: the gateway sets it.",
                details={"field": forbidden},
            )
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("request.messages must be a non-empty list.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise InvalidRequest(
                f"request.messages[{i}] must be an object with a role and content.",
                details={"index": i},
            )
    max_tokens = request.get("max_tokens", request.get("max_completion_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise InvalidRequest("max_tokens must be a positive integer.")
    return request


def chat(
    *,
    model: str,
    request: dict,
    caller: Caller | None = None,
    interactive: bool = True,
    cache: str = "default",
    run_index: int | None = None,
    deadline_s: float | None = None,
) -> Result:
    """One chat completion through the gateway (see jobs/gateway/__init__.py)."""
    body = _check_body(request)
    max_tokens = int(
        body.get("max_tokens")
        or body.get("max_completion_tokens")
        or settings.GATEWAY_DEFAULT_MAX_TOKENS
    )
    return _call(
        operation="chat",
        model_key=model,
        body=body,
        payload=body,
        caller=caller,
        interactive=interactive,
        cache=cache,
        run_index=run_index,
        deadline_s=deadline_s,
        max_tokens=max_tokens,
    )


def embed(
    *,
    model: str,
    input: str | list[str],
    caller: Caller | None = None,
    interactive: bool = True,
    cache: str = "default",
    deadline_s: float | None = None,
) -> Result:
    """Embeddings of ``input`` through the gateway (OpenAI CreateEmbeddingResponse shape)."""
    inputs = [input] if isinstance(input, str) else list(input or [])
    if not inputs or not all(isinstance(t, str) and t for t in inputs):
        raise InvalidRequest("input must be a non-empty string or list of non-empty strings.")
    return _call(
        operation="embeddings",
        model_key=model,
        body={"input": inputs},
        payload=inputs,
        caller=caller,
        interactive=interactive,
        cache=cache,
        run_index=None,
        deadline_s=deadline_s,
        max_tokens=0,
    )
