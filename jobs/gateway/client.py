"""The gateway's calls: resolve the model, cache, breaker, rate limits, budget reservation,
retries, ledger. ``chat`` and ``embed`` are re-exported by ``jobs.gateway``."""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from collections.abc import Iterator
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
    completion_as_chunks,
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
    reservation: Any = None,
) -> Any:
    """The provider's answer (a ProviderResponse; for ``chat_stream`` the first chunk and the
    iterator of the rest), retried on transient errors within the deadline."""
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
        if attempt > 1:  # the write-ahead row counts the retry before it leaves
            billing.llm_call_attempt(reservation=reservation, attempts=attempt)
        started = clock()
        try:
            if operation == "chat":
                out = adapter.chat(
                    model, payload, timeout=min(per_request, remaining), request_id=meta.request_id
                )
            elif operation == "chat_stream":
                # Retried until the first chunk arrives; (first chunk, the rest) after that.
                stream = adapter.chat_stream(
                    model, payload, timeout=min(per_request, remaining), request_id=meta.request_id
                )
                try:
                    out = (next(stream), stream)
                except StopIteration:
                    raise ProviderCallError(
                        f"{model.provider.slug} ended the stream before its first chunk",
                        transient=True,
                        reason="empty_stream",
                    ) from None
                except BaseException:
                    stream.close()
                    raise
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


@dataclass
class _Call:
    """One call's state between its pre-call and post-call steps (shared by ``chat``,
    ``chat_stream`` and ``embed``)."""

    operation: str
    caller: Caller
    meta: CallMeta
    started: float
    model: RegisteredModel | None = None
    conf: dict = field(default_factory=dict)
    deadline_at: float = 0.0
    hit: dict | None = None  # the cached answer, when the cache had one
    adapter: BaseProvider | None = None
    breaker: Breaker | None = None
    prompt_est: int = 0
    reservation: Any = None
    outcome: str = "ok"


def _begin(
    *,
    operation: str,
    model_key: str,
    caller: Caller | None,
    cache: str,
    deadline_s: float | None,
) -> _Call:
    if cache not in response_cache.MODES:
        raise InvalidRequest(f"cache must be one of {', '.join(response_cache.MODES)}.")
    request_id = current_request_id() or uuid.uuid4().hex
    return _Call(
        operation=operation,
        caller=caller or Caller(),
        meta=CallMeta(provider="", model=model_key, request_id=request_id),
        started=time.perf_counter(),
    )


def _before(
    state: _Call,
    *,
    body: dict,
    payload: Any,
    interactive: bool,
    cache: str,
    run_index: int | None,
    deadline_s: float | None,
    max_tokens: int,
) -> None:
    """The pre-call steps: resolve the model, look in the cache (``state.hit``), then the
    breaker, the rate limits and the budget reservation."""
    meta, operation = state.meta, state.operation
    model = _resolve(meta.model, "chat" if operation == "chat" else "embeddings")
    state.model = model
    meta.provider = model.provider.slug
    conf = state.conf = settings_effective()
    state.deadline_at = clock() + float(
        deadline_s if deadline_s is not None else conf["deadline_s"]
    )
    key = response_cache.cache_key(
        provider=model.provider.slug,
        remote_id=model.remote_id,
        revision=model.revision,
        operation=operation,
        body=body,
        run_index=run_index,
    )
    meta.cache_key = key
    breaker = state.breaker = Breaker(
        model.provider.slug,
        threshold=int(conf["breaker_failure_threshold"]),
        reset_s=float(conf["breaker_reset_s"]),
    )
    breaker_state = None
    if cache == "default":
        # The answer and the provider's breaker state in one cache round trip.
        hit, breaker_state = response_cache.lookup_with(key, breaker.state_keys())
        if hit is not None:
            meta.cached = True
            meta.prompt_tokens = hit["prompt_tokens"]
            meta.completion_tokens = hit["completion_tokens"]
            state.hit = hit
            return

    adapter = state.adapter = provider_for(model.provider)
    if operation == "chat":
        # The provider's count (the exact tokenizer offline) where the price makes it
        # matter; the byte heuristic otherwise (it also feeds the token rate limits).
        paid = model.is_priced and (model.price_input_per_m or model.price_output_per_m)
        prompt_est = adapter.prompt_tokens(model, body) if paid else estimate_prompt_tokens(body)
    else:
        prompt_est = sum(estimate_tokens(text) for text in payload)
    state.prompt_est = prompt_est
    worst = call_cost(model, prompt_est, max_tokens)

    wait = breaker.before_call(breaker_state)
    if wait is not None:
        raise CircuitOpen(
            f"Provider '{model.provider.slug}' is failing; calls to it are paused for {wait:.1f}s.",
            retry_after=wait,
            transient=True,
            details={"provider": model.provider.slug},
        )
    _rate_limit(
        model,
        tokens=prompt_est + max_tokens,
        interactive=interactive,
        deadline_at=state.deadline_at,
        meta=meta,
    )
    # Write-ahead: the ledger row (in flight, one attempt) and the worst-case hold on the
    # budget are committed before the request leaves, so a process killed during the call
    # still leaves the call in the ledger (``calls_recover`` settles it).
    caller = state.caller
    try:
        state.reservation = billing.llm_call_open(
            amount=worst,
            ttl_s=max(60.0, state.deadline_at - clock() + 60.0),
            cache_key=key,
            **_ledger_identity(meta, caller, operation),
        )
    except billing.BudgetExceeded as exc:
        raise BudgetExceeded(exc.message, details=exc.details) from None


def _after(
    state: _Call, *, body: dict, prompt_tokens: int, completion_tokens: int, cache: str
) -> str:
    """The post-call steps of a completed call: its tokens and cost, and the answer stored
    in the cache (unless ``no-store``). Returns the stored JSON."""
    meta, model = state.meta, state.model
    meta.prompt_tokens, meta.completion_tokens = prompt_tokens, completion_tokens
    meta.cost = call_cost(model, prompt_tokens, completion_tokens)
    raw = orjson.dumps(body).decode()
    if cache != "no-store":
        response_cache.store(
            meta.cache_key,
            raw=raw,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            ttl_s=int(state.conf["cache_ttl_s"]),
        )
    return raw


def _failed(state: _Call, exc: BaseException) -> None:
    state.outcome = (
        f"error:{exc.code}" if isinstance(exc, GatewayError) else f"error:{type(exc).__name__}"
    )


def _end(state: _Call) -> None:
    """The ledger row (and the reservation settled in it), whatever the outcome."""
    state.meta.latency_ms = (time.perf_counter() - state.started) * 1000
    if state.meta.provider:  # a model that does not resolve is a bad input: nothing recorded
        _record(state.meta, state.caller, state.operation, state.outcome, state.reservation)


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
    state = _begin(
        operation=operation, model_key=model_key, caller=caller, cache=cache, deadline_s=deadline_s
    )
    try:
        _before(
            state,
            body=body,
            payload=payload,
            interactive=interactive,
            cache=cache,
            run_index=run_index,
            deadline_s=deadline_s,
            max_tokens=max_tokens,
        )
        if state.hit is not None:
            return Result(orjson.loads(state.hit["raw"]), state.meta, state.hit["raw"])
        out = _with_retries(
            adapter=state.adapter,
            model=state.model,
            operation=operation,
            payload=payload,
            conf=state.conf,
            deadline_at=state.deadline_at,
            breaker=state.breaker,
            meta=state.meta,
            reservation=state.reservation,
        )
        raw = _after(
            state,
            body=out.body,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            cache=cache,
        )
        return Result(out.body, state.meta, raw)
    except BaseException as exc:
        _failed(state, exc)
        raise
    finally:
        _end(state)


def _ledger_identity(meta: CallMeta, caller: Caller, operation: str) -> dict:
    """Who made the call and what it was: the same on its write-ahead row and its settlement."""
    return {
        "user": caller.user,
        "feature": caller.feature,
        "subject": caller.subject,
        "attribution": caller.attribution,
        "provider": meta.provider,
        "model": meta.model,
        "operation": operation,
        "request_id": meta.request_id,
    }


def _record(meta: CallMeta, caller: Caller, operation: str, outcome: str, reservation) -> None:
    """The call's ledger row; its reservation settles in the same transaction."""
    try:
        call = billing.llm_call_record(
            reservation=reservation,
            **_ledger_identity(meta, caller, operation),
            prompt_tokens=meta.prompt_tokens,
            completion_tokens=meta.completion_tokens,
            cost=meta.cost,
            latency_ms=meta.latency_ms,
            attempts=meta.attempts,
            cached=meta.cached,
            outcome=outcome,
        )
        meta.ledger_id = call.pk
    except Exception:
        # The ledger must not hide the call's own outcome. A write-ahead row keeps its
        # reservation (recovery settles both when it expires); a bare hold is released.
        logger.exception("gateway ledger write failed", extra={"request_id": meta.request_id})
        if reservation is not None and getattr(reservation, "call_id", None):
            return
        try:
            billing.llm_budget_release(reservation=reservation)
        except Exception:
            logger.exception("gateway reservation release failed")


def _orphan_settlement(reservation) -> dict:
    """How an orphaned call (its process died between the write-ahead row and the ledger)
    settles: as answered, with its exact tokens and cost, when its answer reached the response
    cache (the rerun of its task will be a cache hit); else as lost, at the held worst case."""
    hit = response_cache.lookup(reservation.cache_key) if reservation.cache_key else None
    model = _lookup(reservation.model) if hit is not None else None
    if hit is None or model is None:
        return {"outcome": "error:worker_lost"}
    prompt, completion = int(hit["prompt_tokens"]), int(hit["completion_tokens"])
    return {
        "outcome": "ok",
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost": call_cost(model, prompt, completion),
    }


billing.orphan_resolver = _orphan_settlement


def calls_recover(*, subject_type=None, subject_ids=None, now=None) -> int:
    """Settle the ledger rows of calls whose process died mid-call: those of the given
    subjects (their worker is known dead, e.g. batch tasks reclaimed after a SIGKILL), or
    (no subjects) every one whose reservation expired. Returns how many were settled."""
    settled = 0
    for reservation in billing.llm_orphans(
        now=now, subject_type=subject_type, subject_ids=subject_ids
    ):
        settled += billing.llm_orphan_settle(
            reservation=reservation, **_orphan_settlement(reservation)
        )
    return settled


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


class ChatStream:
    """The chunks of ``chat_stream`` (an iterator of ``chat.completion.chunk`` dicts).
    ``close()`` (or dropping it) ends the call early: the provider's stream closes, the ledger
    row is written and the reservation settles."""

    def __init__(self, chunks: Iterator[dict | None], meta: CallMeta):
        self._chunks = chunks
        self.meta = meta

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> dict:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit: nothing left to do
            self._chunks.close()


def _error_event(exc: GatewayError, request_id: str) -> dict:
    return {
        "error": {
            "code": exc.code,
            "message": exc.message,
            "details": exc.details or {},
            "request_id": request_id,
        }
    }


def _stream(
    state: _Call,
    *,
    body: dict,
    interactive: bool,
    cache: str,
    run_index: int | None,
    deadline_s: float | None,
    max_tokens: int,
    include_usage: bool,
) -> Iterator[dict | None]:
    """The generator behind ``chat_stream``: everything up to the provider's first chunk runs
    on the first ``next()`` (which yields None), so refusals and failures before the stream
    starts raise to the caller; the try/finally settles the call however it ends (completed,
    a provider error mid-stream, or GeneratorExit when the reader goes away)."""
    meta = state.meta
    stream = None
    finished = False
    text: list[str] = []
    try:
        _before(
            state,
            body=body,
            payload=body,
            interactive=interactive,
            cache=cache,
            run_index=run_index,
            deadline_s=deadline_s,
            max_tokens=max_tokens,
        )
        if state.hit is not None:
            yield None
            for chunk in completion_as_chunks(orjson.loads(state.hit["raw"])):
                if include_usage or "usage" not in chunk:
                    yield chunk
            finished = True
            return
        first, stream = _with_retries(
            adapter=state.adapter,
            model=state.model,
            operation="chat_stream",
            payload=body,
            conf=state.conf,
            deadline_at=state.deadline_at,
            breaker=state.breaker,
            meta=meta,
            reservation=state.reservation,
        )
        yield None
        ident, created = first.get("id"), first.get("created") or int(time.time())
        remote = first.get("model") or state.model.remote_id
        finish = None
        usage = None
        chunk = first
        try:
            while True:
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        text.append(delta["content"])
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                if chunk.get("choices") or not chunk.get("usage"):
                    yield (
                        chunk if include_usage else {k: v for k, v in chunk.items() if k != "usage"}
                    )
                chunk = next(stream)
        except StopIteration:
            pass
        except ProviderCallError as exc:
            # After the first chunk nothing is retried: the stream ends with an error event.
            if exc.transient and state.breaker.failure():
                logger.warning("gateway breaker of provider %s opened", meta.provider)
            reason = _scrub(exc.message, state.adapter.secrets())
            error = ProviderError(
                f"{state.model.key} broke off mid-answer: {reason}",
                code="stream_interrupted",
                transient=True,
                details={"provider": meta.provider},
            )
            state.outcome = f"error:{error.code}"
            yield _error_event(error, meta.request_id)
            return
        answer = "".join(text)
        if usage and usage.get("prompt_tokens") is not None:
            prompt, completion = int(usage["prompt_tokens"]), int(usage["completion_tokens"] or 0)
        else:
            prompt, completion = state.prompt_est, estimate_tokens(answer)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        whole = {
            "id": ident or f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": created,
            "model": remote,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer},
                    "finish_reason": finish or "stop",
                }
            ],
            "usage": usage,
        }
        _after(state, body=whole, prompt_tokens=prompt, completion_tokens=completion, cache=cache)
        finished = True
        if include_usage:
            yield {
                "id": whole["id"],
                "object": "chat.completion.chunk",
                "created": created,
                "model": remote,
                "choices": [],
                "usage": usage,
            }
    except GeneratorExit:
        if not finished:
            state.outcome = "error:client_closed"
        raise
    except BaseException as exc:
        _failed(state, exc)
        raise
    finally:
        if stream is not None:
            stream.close()
        if not finished and stream is not None and not meta.cached:
            # Ended after the stream started: charge what the provider produced until then.
            meta.prompt_tokens = state.prompt_est
            meta.completion_tokens = estimate_tokens("".join(text)) if text else 0
            meta.cost = call_cost(state.model, meta.prompt_tokens, meta.completion_tokens)
        _end(state)


def chat_stream(
    *,
    model: str,
    request: dict,
    caller: Caller | None = None,
    interactive: bool = True,
    cache: str = "default",
    run_index: int | None = None,
    deadline_s: float | None = None,
    include_usage: bool = True,
) -> ChatStream:
    """One chat completion streamed through the gateway: an iterator of OpenAI
    ``chat.completion.chunk`` dicts (the last one carries ``usage`` when ``include_usage``).

    The same path as ``chat``: registry, cache (a hit replays the stored answer as chunks; a
    completed stream is stored under the key ``chat`` uses, so the two share hits), breaker,
    rate limit, budget reservation, retries until the first chunk arrives. Errors before the
    first chunk raise here, as ``chat``'s do; one after it ends the stream with an
    ``{"error": {...}}`` item. The ledger row is written and the reservation settled when the
    stream ends, is closed early, or is dropped."""
    body = _check_body(request)
    max_tokens = int(
        body.get("max_tokens")
        or body.get("max_completion_tokens")
        or settings.GATEWAY_DEFAULT_MAX_TOKENS
    )
    state = _begin(
        operation="chat", model_key=model, caller=caller, cache=cache, deadline_s=deadline_s
    )
    chunks = _stream(
        state,
        body=body,
        interactive=interactive,
        cache=cache,
        run_index=run_index,
        deadline_s=deadline_s,
        max_tokens=max_tokens,
        include_usage=include_usage,
    )
    next(chunks)  # the pre-call steps and the first chunk: refusals raise here
    return ChatStream(chunks, state.meta)
