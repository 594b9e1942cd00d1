"""The one way Crucible calls an LLM: an OpenAI-compatible endpoint, the Hugging Face router,
or, when neither is configured, the offline model on this machine.

``huggingface_hub.InferenceClient`` speaks ``/v1/chat/completions`` to any base URL, so the
same code reaches the HF router (``https://router.huggingface.co/v1`` with ``HF_TOKEN``), a
vLLM/TGI server or an OpenAI-compatible gateway (``MODEL_GATEWAY_URL``). Errors are tagged:
timeouts, connection failures, 429 (with its Retry-After) and 5xx are transient and retried
with backoff (config/retry.py); other 4xx are permanent and fail at once. Every endpoint call's
tokens go to the cost ledger (billing.services.llm_usage_record).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from config.errors import ExternalServiceError
from config.retry import call_with_retry

logger = logging.getLogger("crucible.model_client")

HF_ROUTER_URL = "https://router.huggingface.co/v1"
SERVICE = "model_gateway"


@dataclass
class ChatResult:
    text: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    seconds: float = 0.0
    offline: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Usage:
    """Tokens this client has used so far (all calls, all retries that answered)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    by_model: dict[str, int] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _retry_after(response) -> float | None:
    value = response.headers.get("Retry-After") if response is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, moment.timestamp() - time.time())


def classify_error(exc: BaseException) -> ExternalServiceError:
    """Any failure of an InferenceClient call -> a transient or permanent ExternalServiceError."""
    # huggingface_hub 2.x speaks HTTP through httpx2 (the httpx fork it ships with).
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError

    if isinstance(exc, ExternalServiceError):
        return exc
    if isinstance(exc, InferenceTimeoutError | httpx2.TimeoutException):
        return ExternalServiceError(
            f"The model endpoint timed out: {exc}", service=SERVICE, transient=True
        )
    if isinstance(exc, httpx2.TransportError):
        return ExternalServiceError(
            f"The model endpoint could not be reached: {exc}", service=SERVICE, transient=True
        )
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        transient = status == 429 or status >= 500 or status == 408
        detail = ""
        try:
            detail = exc.response.text[:300]
        except Exception:  # a streamed body that was never read
            detail = ""
        return ExternalServiceError(
            f"The model endpoint answered {status}: {detail or exc}",
            service=SERVICE,
            transient=transient,
            retry_after=_retry_after(exc.response) if transient else None,
            details={"service": SERVICE, "transient": transient, "status": status},
        )
    return ExternalServiceError(
        f"The model endpoint call failed: {type(exc).__name__}: {exc}",
        service=SERVICE,
        transient=False,
    )


class ModelClient:
    """Chat completions through one configured endpoint (or the offline model)."""

    def __init__(
        self,
        *,
        base_url: str = "",
        api_key: str = "",
        model: str = "",
        timeout: float = 60.0,
        attempts: int = 4,
        price_per_1k_tokens: float = 0.0,
        sleep: Callable[[float], None] | None = None,
        offline_answer: Callable[[list[dict], int], str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self.timeout = timeout
        self.attempts = attempts
        self.price_per_1k_tokens = price_per_1k_tokens
        self.sleep = sleep
        self.offline_answer = offline_answer
        self.usage = Usage()
        self._client = None

    @property
    def configured(self) -> bool:
        return bool(self.base_url)

    @property
    def name(self) -> str:
        return self.model if self.configured else "offline"

    def _inference_client(self):
        if self._client is None:
            from huggingface_hub import InferenceClient

            self._client = InferenceClient(
                base_url=self.base_url, api_key=self.api_key or None, timeout=self.timeout
            )
        return self._client

    def chat(
        self,
        messages: list[dict],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        subject: Any = None,
        attribution: str = "",
    ) -> ChatResult:
        if not self.configured:
            if self.offline_answer is None:
                raise ExternalServiceError(
                    "No model endpoint is configured (set MODEL_GATEWAY_URL or HF_TOKEN).",
                    service=SERVICE,
                    transient=False,
                )
            started = time.monotonic()
            text = self.offline_answer(messages, max_tokens)
            return ChatResult(
                text=text, model="offline", seconds=time.monotonic() - started, offline=True
            )

        def once():
            try:
                return self._inference_client().chat_completion(
                    messages, model=self.model, max_tokens=max_tokens, temperature=temperature
                )
            except Exception as exc:
                raise classify_error(exc) from exc

        started = time.monotonic()
        output = call_with_retry(
            once, attempts=self.attempts, maximum=max(30.0, self.timeout), sleep=self.sleep
        )
        choice = output.choices[0]
        usage = getattr(output, "usage", None)
        result = ChatResult(
            text=choice.message.content or "",
            model=getattr(output, "model", None) or self.model,
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            finish_reason=choice.finish_reason or "",
            seconds=time.monotonic() - started,
        )
        self._count(result, subject=subject, attribution=attribution)
        return result

    def _count(self, result: ChatResult, *, subject: Any, attribution: str) -> None:
        self.usage.calls += 1
        self.usage.prompt_tokens += result.prompt_tokens
        self.usage.completion_tokens += result.completion_tokens
        self.usage.by_model[result.model] = (
            self.usage.by_model.get(result.model, 0) + result.total_tokens
        )
        from billing.services import llm_usage_record

        amount = Decimal(str(self.price_per_1k_tokens)) * result.total_tokens / 1000
        llm_usage_record(
            amount=amount,
            tokens=result.total_tokens,
            model=result.model,
            subject=subject,
            attribution=attribution,
        )


def model_client(**overrides) -> ModelClient:
    """The client the settings describe: MODEL_GATEWAY_URL, else the HF router with HF_TOKEN,
    else offline."""
    from django.conf import settings

    base_url = settings.MODEL_GATEWAY_URL
    api_key = settings.MODEL_GATEWAY_API_KEY
    if not base_url and settings.HF_TOKEN:
        base_url, api_key = HF_ROUTER_URL, settings.HF_TOKEN
    options = {
        "base_url": base_url,
        "api_key": api_key or settings.HF_TOKEN,
        "model": settings.MODEL_GATEWAY_MODEL,
        "timeout": settings.MODEL_GATEWAY_TIMEOUT_S,
        "attempts": settings.MODEL_GATEWAY_ATTEMPTS,
        "price_per_1k_tokens": settings.MODEL_GATEWAY_PRICE_PER_1K_TOKENS,
    }
    return ModelClient(**{**options, **overrides})


# --- Rubric judging ------------------------------------------------------------------------


def _key(dimension: dict) -> str:
    return dimension.get("key") or dimension["name"]


def judge_messages(*, dimensions: list[dict], prompt: str, response: str) -> list[dict]:
    """The chat asking a judge model for 1-5 scores, as one JSON object."""
    lines = []
    for dim in dimensions:
        anchors = dim.get("anchors") or {}
        anchor_text = "; ".join(f"{k} = {v}" for k, v in sorted(anchors.items()))
        lines.append(
            f"- {_key(dim)} ({dim.get('name', _key(dim))}): {dim.get('description', '')}"
            + (f" ({anchor_text})" if anchor_text else "")
        )
    names = ", ".join(f'"{_key(d)}"' for d in dimensions)
    system = (
        "You are a strict evaluator of a financial advisor's replies. Score the reply on each "
        "criterion from 1 (poor) to 5 (excellent). Answer with one JSON object and nothing else, "
        f"with the integer keys {names}."
    )
    user = (
        "Criteria:\n"
        + "\n".join(lines)
        + f"\n\nClient message:\n{prompt}\n\nAdvisor reply:\n{response}\n\nJSON scores:"
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_scores(text: str, names: list[str]) -> dict[str, int]:
    """The first JSON object in ``text`` with an integer 1-5 for every name."""
    match = re.search(r"\{.*?\}", text, flags=re.DOTALL)
    if not match:
        raise ExternalServiceError(
            f"The judge did not answer with JSON scores: {text[:200]!r}",
            service=SERVICE,
            transient=False,
        )
    try:
        data = json.loads(match.group(0))
        scores = {name: int(data[name]) for name in names}
    except (ValueError, KeyError, TypeError) as exc:
        raise ExternalServiceError(
            f"The judge's scores are incomplete or not integers: {match.group(0)[:200]!r}",
            service=SERVICE,
            transient=False,
        ) from exc
    bad = {k: v for k, v in scores.items() if not 1 <= v <= 5}
    if bad:
        raise ExternalServiceError(
            f"The judge gave scores outside 1-5: {bad}", service=SERVICE, transient=False
        )
    return scores


def judge_with_endpoint(
    client: ModelClient,
    *,
    dimensions: list[dict],
    prompt: str,
    response: str,
    subject: Any = None,
    attribution: str = "",
) -> tuple[dict[str, int], dict]:
    """(scores, raw) from the configured endpoint."""
    result = client.chat(
        judge_messages(dimensions=dimensions, prompt=prompt, response=response),
        max_tokens=200,
        temperature=0.0,
        subject=subject,
        attribution=attribution,
    )
    scores = parse_scores(result.text, [_key(d) for d in dimensions])
    raw = {"text": result.text[:2000], "tokens": result.total_tokens, "model": result.model}
    return scores, raw
