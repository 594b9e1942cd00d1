"""The LLM port: how the apps below jobs (training, corpora) call models without importing it.

Every LLM call goes through the model gateway in jobs (jobs/gateway), and the layers contract
in pyproject.toml keeps training and corpora from importing jobs. They call these functions
instead; jobs fills them in from ``JobsConfig.ready()`` (``register``). config imports no app.

    from config import llm

    result = llm.chat(model="offline/smollm2-135m-instruct",
                      request={"messages": [...], "max_tokens": 64},
                      caller=llm.caller(user=user, feature="rag", subject=kb))
    result.text, result.meta

The results and the callers are the gateway's own objects (jobs/gateway/__init__.py
documents them); its errors are CrucibleErrors whose base class is ``llm.error_type()``.
Without a registered gateway every call raises ``LLMUnavailable``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from config.errors import CrucibleError


class LLMUnavailable(CrucibleError):
    status_code = 503
    code = "llm_unavailable"
    default_message = "No model gateway is installed here."


@dataclass(frozen=True)
class Gateway:
    """What the gateway lends the port (the callables keep the gateway's signatures)."""

    chat: Callable[..., Any]  # chat(*, model, request, caller=None, interactive=True, ...)
    embed: Callable[..., Any]  # embed(*, model, input, caller=None, interactive=True, ...)
    model_keys: Callable[[str], list[str]]  # enabled models' keys with a capability
    caller: Callable[..., Any]  # caller(*, user=None, feature="other", subject=None, ...)
    adapter_model: Callable[..., Any]  # adapter_model(*, job) -> a model with .key, .parent
    error: type[Exception] = CrucibleError  # base class of the gateway's errors


_gateway: Gateway | None = None


def register(gateway: Gateway | None) -> None:
    """Install the gateway behind the port (jobs, from JobsConfig.ready())."""
    global _gateway
    _gateway = gateway


def registered() -> bool:
    return _gateway is not None


def _port() -> Gateway:
    if _gateway is None:
        raise LLMUnavailable()
    return _gateway


def chat(**kwargs) -> Any:
    """One chat completion (the gateway's ``chat``: model, request, caller, interactive...)."""
    return _port().chat(**kwargs)


def embed(**kwargs) -> Any:
    """Embeddings of ``input`` (the gateway's ``embed``: model, input, caller, ...)."""
    return _port().embed(**kwargs)


def model_keys(*, capability: str) -> list[str]:
    """The keys of the enabled models with ``capability`` ("chat", "embeddings")."""
    return list(_port().model_keys(capability))


def caller(**kwargs) -> Any:
    """Who calls and for what, for the ledger (user, feature, subject, attribution)."""
    return _port().caller(**kwargs)


def adapter_model(*, job) -> Any:
    """A training job's LoRA adapter registered as a model (``.key``; ``.parent`` the base
    model's key); idempotent."""
    return _port().adapter_model(job=job)


def error_type() -> type[Exception]:
    """The base class of the gateway's errors (LLMUnavailable's base without a gateway)."""
    return _gateway.error if _gateway is not None else CrucibleError
