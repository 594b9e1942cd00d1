"""Providers behind one interface: any OpenAI-compatible endpoint (the official ``openai`` SDK,
its own retries off: the gateway retries) and the offline models on this machine.

A provider kind maps to a class in PROVIDER_CLASSES (``@register("kind")``); adding a kind
adds a class here and a Provider row, and no caller changes. Providers raise
ProviderCallError (transient or permanent, with the server's Retry-After) and return the
response body as the OpenAI-shaped dict it is on the wire.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import math
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import orjson
from django.conf import settings

from jobs.models import Provider, RegisteredModel

TRANSIENT_STATUSES = frozenset({408, 409, 429})

# Offline remote ids -> gpu.model's offline model names.
OFFLINE_CHAT_MODELS = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct"}
OFFLINE_EMBEDDING_MODELS = {"all-minilm-l6-v2"}


class ProviderCallError(Exception):
    """One failed attempt. ``transient``: worth retrying; ``retry_after``: the server's ask."""

    def __init__(
        self,
        message: str,
        *,
        transient: bool,
        status: int | None = None,
        retry_after: float | None = None,
        reason: str = "",
    ):
        super().__init__(message)
        self.message = message
        self.transient = transient
        self.status = status
        self.retry_after = retry_after
        self.reason = reason or (f"http_{status}" if status else "error")


@dataclass
class ProviderResponse:
    body: dict
    prompt_tokens: int
    completion_tokens: int


def estimate_tokens(text: str) -> int:
    """An upper-leaning token count without a tokenizer: about 3 bytes a token (BPE
    vocabularies average 3.5-4.5 bytes a token on English; fewer bytes is the safe side for a
    budget reservation)."""
    return math.ceil(len(text.encode("utf-8")) / 3)


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or OpenAI content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "") if isinstance(part, dict) else str(part) for part in content
        )
    return str(content)


def estimate_prompt_tokens(request: dict) -> int:
    total = 3
    for message in request.get("messages") or []:
        total += 4 + estimate_tokens(message_text(message.get("content")))
    for key in ("tools", "response_format"):
        if request.get(key):
            total += estimate_tokens(orjson.dumps(request[key]).decode())
    return total


def parse_retry_after(headers) -> float | None:
    """Seconds from ``retry-after-ms`` (OpenAI's, more precise) or ``retry-after``
    (seconds or an HTTP date)."""
    if headers is None:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class BaseProvider:
    kind: ClassVar[str] = ""

    def __init__(self, provider: Provider):
        self.provider = provider

    def chat(
        self, model: RegisteredModel, request: dict, *, timeout: float, request_id: str
    ) -> ProviderResponse:
        raise NotImplementedError

    def chat_stream(
        self, model: RegisteredModel, request: dict, *, timeout: float, request_id: str
    ) -> Iterator[dict]:
        """OpenAI ``chat.completion.chunk`` dicts, the last carrying ``usage``. A provider
        without a streaming call answers whole and replays the answer as chunks."""
        out = self.chat(model, request, timeout=timeout, request_id=request_id)
        yield from completion_as_chunks(out.body)

    def embed(
        self, model: RegisteredModel, inputs: list[str], *, timeout: float, request_id: str
    ) -> ProviderResponse:
        raise NotImplementedError

    def list_models(self, *, timeout: float = 30.0) -> list[dict]:
        """The provider's models as ``GET /v1/models`` lists them (id, and whatever else)."""
        raise NotImplementedError

    def prompt_tokens(self, model: RegisteredModel, request: dict) -> int:
        """Prompt tokens of a chat request, for the budget reservation and token limits."""
        return estimate_prompt_tokens(request)

    def secrets(self) -> list[str]:
        """Strings that must never reach a log or an error message."""
        return []


def _text_pieces(text: str) -> list[str]:
    """Word-sized pieces (whitespace kept) of a whole answer replayed as a stream."""
    return re.findall(r"\s*\S+|\s+$", text)


def completion_as_chunks(body: dict) -> Iterator[dict]:
    """A whole ChatCompletion as the chunks a stream of it would be: the role, the content in
    word-sized pieces, the finish reason, then one usage chunk."""
    base = {
        "id": body.get("id") or f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": body.get("created") or int(time.time()),
        "model": body.get("model") or "",
    }
    choice = (body.get("choices") or [{}])[0]
    text = message_text((choice.get("message") or {}).get("content"))
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    for piece in _text_pieces(text):
        yield {**base, "choices": [{"index": 0, "delta": {"content": piece}}]}
    yield {
        **base,
        "choices": [{"index": 0, "delta": {}, "finish_reason": choice.get("finish_reason")}],
    }
    yield {**base, "choices": [], "usage": body.get("usage")}


PROVIDER_CLASSES: dict[str, type[BaseProvider]] = {}


def register(kind: str):
    def decorate(cls: type[BaseProvider]) -> type[BaseProvider]:
        cls.kind = kind
        PROVIDER_CLASSES[kind] = cls
        return cls

    return decorate


def provider_for(provider: Provider) -> BaseProvider:
    cls = PROVIDER_CLASSES.get(provider.kind)
    if cls is None:
        raise ProviderCallError(
            f"Provider '{provider.slug}' has the unknown kind {provider.kind!r}; known kinds: "
            f"{', '.join(sorted(PROVIDER_CLASSES))}.",
            transient=False,
            reason="unknown_kind",
        )
    return cls(provider)


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "****")
    return text


# --- OpenAI-compatible endpoints ----------------------------------------------------------------

_clients: dict[tuple[str, str], Any] = {}
_clients_lock = threading.Lock()


@register(Provider.Kind.OPENAI)
class OpenAICompatibleProvider(BaseProvider):
    """Any endpoint speaking the OpenAI API (HF router, OpenAI, Together, vLLM...)."""

    def __init__(self, provider: Provider):
        super().__init__(provider)
        self._key = provider.api_key()

    def secrets(self) -> list[str]:
        return [self._key]

    def client(self):
        import openai

        # One client (one connection pool) per endpoint and key, reused by every call.
        cache_key = (self.provider.base_url, hashlib.sha256(self._key.encode()).hexdigest())
        client = _clients.get(cache_key)
        if client is None:
            with _clients_lock:
                client = _clients.get(cache_key)
                if client is None:
                    client = openai.OpenAI(
                        base_url=self.provider.base_url,
                        # The SDK refuses an empty key; a keyless local server ignores it.
                        api_key=self._key or "no-key",
                        max_retries=0,
                        timeout=float(self.provider.timeout_s or 60.0),
                    )
                    _clients[cache_key] = client
        return client

    @contextlib.contextmanager
    def _errors(self, timeout: float):
        """The SDK's exceptions as ProviderCallError (transient or permanent)."""
        import openai

        try:
            yield
        except openai.APIStatusError as exc:
            status = exc.status_code
            transient = status in TRANSIENT_STATUSES or status >= 500
            message = _redact(
                f"{self.provider.slug} answered HTTP {status}: {exc.message}", [self._key]
            )
            raise ProviderCallError(
                message[:500],
                transient=transient,
                status=status,
                retry_after=parse_retry_after(exc.response.headers),
            ) from None
        except openai.APITimeoutError:
            raise ProviderCallError(
                f"{self.provider.slug} did not answer within {timeout:.1f}s",
                transient=True,
                reason="timeout",
            ) from None
        except openai.APIConnectionError as exc:
            cause = type(exc.__cause__).__name__ if exc.__cause__ else "connection error"
            raise ProviderCallError(
                f"{self.provider.slug} could not be reached ({cause})",
                transient=True,
                reason="connection",
            ) from None
        except openai.APIResponseValidationError:
            raise ProviderCallError(
                f"{self.provider.slug} sent a malformed response",
                transient=True,
                reason="malformed_body",
            ) from None
        except openai.APIError as exc:  # e.g. an error event inside a stream
            raise ProviderCallError(
                _redact(f"{self.provider.slug} failed: {exc.message}", [self._key])[:500],
                transient=True,
                reason="stream_error",
            ) from None
        except httpx.HTTPError as exc:  # the connection broke while a stream was read
            raise ProviderCallError(
                f"{self.provider.slug} broke off ({type(exc).__name__})",
                transient=True,
                reason="connection",
            ) from None

    def _call(self, fn, *, request_id: str, timeout: float, check):
        with self._errors(timeout):
            raw = fn(timeout=timeout, extra_headers={"X-Request-ID": request_id})
        http = raw.http_response
        try:
            body = orjson.loads(http.content)
        except orjson.JSONDecodeError:
            raise ProviderCallError(
                f"{self.provider.slug} sent a body that is not JSON (HTTP {http.status_code})",
                transient=True,
                status=http.status_code,
                reason="malformed_body",
            ) from None
        if not isinstance(body, dict) or not check(body):
            raise ProviderCallError(
                f"{self.provider.slug} sent a response without the expected fields",
                transient=True,
                status=http.status_code,
                reason="malformed_body",
            )
        return body

    def chat(self, model, request, *, timeout, request_id):
        body = self._call(
            lambda **kw: self.client().chat.completions.with_raw_response.create(
                model=model.remote_id, **request, **kw
            ),
            request_id=request_id,
            timeout=timeout,
            check=lambda b: isinstance(b.get("choices"), list) and bool(b["choices"]),
        )
        usage = body.get("usage") or {}
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if prompt is None:
            prompt = self.prompt_tokens(model, request)
        if completion is None:
            texts = [message_text((c.get("message") or {}).get("content")) for c in body["choices"]]
            completion = sum(estimate_tokens(t) for t in texts)
        return ProviderResponse(body, int(prompt), int(completion))

    def chat_stream(self, model, request, *, timeout, request_id):
        """The SDK's ``stream=True`` with ``include_usage``: chunks as the server sends them.
        Every failure (opening, or mid-stream) comes out as ProviderCallError; closing this
        iterator closes the HTTP response."""
        with self._errors(timeout):
            stream = self.client().chat.completions.create(
                model=model.remote_id,
                **request,
                stream=True,
                stream_options={"include_usage": True},
                timeout=timeout,
                extra_headers={"X-Request-ID": request_id},
            )
        try:
            with self._errors(timeout):
                for chunk in stream:
                    yield chunk.to_dict()
        finally:
            stream.close()

    def embed(self, model, inputs, *, timeout, request_id):
        body = self._call(
            lambda **kw: self.client().embeddings.with_raw_response.create(
                model=model.remote_id, input=inputs, **kw
            ),
            request_id=request_id,
            timeout=timeout,
            check=lambda b: isinstance(b.get("data"), list),
        )
        usage = body.get("usage") or {}
        prompt = usage.get("prompt_tokens")
        if prompt is None:
            prompt = sum(estimate_tokens(t) for t in inputs)
        return ProviderResponse(body, int(prompt), 0)

    def list_models(self, *, timeout: float = 30.0) -> list[dict]:
        body = self._call(
            lambda **kw: self.client().models.with_raw_response.list(**kw),
            request_id=uuid.uuid4().hex,
            timeout=timeout,
            check=lambda b: isinstance(b.get("data"), list),
        )
        return [m for m in body["data"] if isinstance(m, dict) and m.get("id")]


# --- The offline models on this machine ---------------------------------------------------------

_adapter_lock = threading.Lock()


def _adapter_dir(model: RegisteredModel) -> Path:
    """The model's LoRA adapter copied out of storage once (per revision) into the data folder;
    gpu/ cannot read storage itself (it imports no Django)."""
    from config.storage import storage_listdir, storage_read

    tag = re.sub(
        r"[^A-Za-z0-9._-]+",
        "_",
        model.revision or hashlib.sha256(model.adapter_uri.encode()).hexdigest()[:16],
    )
    target = Path(settings.DATA_DIR) / "gateway-adapters" / tag
    if (target / "adapter_config.json").is_file():
        return target
    with _adapter_lock:
        if (target / "adapter_config.json").is_file():
            return target
        root = model.adapter_uri.rstrip("/")

        def walk(path: str) -> list[str]:
            folders, files = storage_listdir(path)
            found = [f"{path}/{name}" for name in files]
            for folder in folders:
                if not folder.startswith("checkpoint-"):  # training checkpoints stay behind
                    found += walk(f"{path}/{folder}")
            return found

        files = walk(root)
        if not any(name.endswith("adapter_config.json") for name in files):
            raise ProviderCallError(
                f"No adapter_config.json under {root}", transient=False, reason="adapter_missing"
            )
        tmp = target.with_name(f".{tag}.tmp-{uuid.uuid4().hex[:8]}")
        for path in files:
            dest = tmp / path[len(root) + 1 :]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(storage_read(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(target)
    return target


@register(Provider.Kind.OFFLINE)
class OfflineProvider(BaseProvider):
    """SmolLM2-135M-Instruct (and LoRA adapters on it) and all-MiniLM-L6-v2, in-process.
    A chat request's ``response_format`` (``json_schema`` or ``json_object``) is honoured by
    constrained decoding (gpu.generate, lm-format-enforcer)."""

    def _base_name(self, model: RegisteredModel) -> str:
        remote = model.remote_id
        if model.adapter_uri and model.parent:
            remote = model.parent.split("/", 1)[-1]
        name = OFFLINE_CHAT_MODELS.get(remote)
        if name is None:
            raise ProviderCallError(
                f"{model.key} is not an offline chat model (offline chat models: "
                f"{', '.join(sorted(OFFLINE_CHAT_MODELS))})",
                transient=False,
                reason="unknown_offline_model",
            )
        return name

    def _load(self, model: RegisteredModel):
        from gpu import generate
        from gpu.model import ensure_offline_model

        base_dir = ensure_offline_model(self._base_name(model), Path(settings.TRAINING_MODEL_CACHE))
        adapter = _adapter_dir(model) if model.adapter_uri else None
        return generate.load_lm(base_dir, adapter, device=settings.GATEWAY_OFFLINE_DEVICE)

    def prompt_tokens(self, model, request):
        from gpu import generate

        loaded = self._load(model)
        return generate.count_chat_tokens(loaded.tokenizer, _plain_messages(request))

    def _decoding(self, request: dict):
        from gpu import generate

        if int(request.get("n") or 1) != 1:
            raise ProviderCallError(
                "The offline model answers one choice per call (n=1).",
                transient=False,
                reason="unsupported",
            )
        stop = request.get("stop") or ()
        decoding = generate.Decoding(
            max_new_tokens=int(
                request.get("max_tokens")
                or request.get("max_completion_tokens")
                or settings.GATEWAY_OFFLINE_MAX_TOKENS
            ),
            temperature=float(request.get("temperature") or 0.0),
            top_p=float(request.get("top_p") or 1.0),
            repetition_penalty=float(request.get("repetition_penalty") or 1.0),
            seed=int(request.get("seed") if request.get("seed") is not None else 0),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
        )
        return decoding

    def chat_stream(self, model, request, *, timeout, request_id):
        """TextIteratorStreamer pieces (gpu.generate.generate_stream) as chunks."""
        from gpu import generate

        decoding = self._decoding(request)
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model.remote_id,
        }
        try:
            loaded = self._load(model)
            pieces = generate.generate_stream(
                loaded,
                _plain_messages(request),
                decoding,
                response_format=request.get("response_format"),
            )
            yield {
                **base,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
            }
            try:
                for piece in pieces:
                    if not piece.done:
                        yield {**base, "choices": [{"index": 0, "delta": {"content": piece.text}}]}
                        continue
                    yield {
                        **base,
                        "choices": [
                            {"index": 0, "delta": {}, "finish_reason": piece.finish_reason}
                        ],
                    }
                    yield {
                        **base,
                        "choices": [],
                        "usage": {
                            "prompt_tokens": piece.prompt_tokens,
                            "completion_tokens": piece.completion_tokens,
                            "total_tokens": piece.prompt_tokens + piece.completion_tokens,
                        },
                    }
            finally:
                pieces.close()  # stops the generating thread when the reader left early
        except ProviderCallError:
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            raise ProviderCallError(
                f"The offline model failed: {type(exc).__name__}: {exc}"[:500],
                transient=False,
                reason="offline_failed",
            ) from None

    def chat(self, model, request, *, timeout, request_id):
        from gpu import generate

        decoding = self._decoding(request)
        try:
            loaded = self._load(model)
            out = generate.generate(
                loaded,
                _plain_messages(request),
                decoding,
                response_format=request.get("response_format"),
            )
        except ProviderCallError:
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            raise ProviderCallError(
                f"The offline model failed: {type(exc).__name__}: {exc}"[:500],
                transient=False,
                reason="offline_failed",
            ) from None
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model.remote_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": out.text},
                    "finish_reason": out.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens,
                "total_tokens": out.prompt_tokens + out.completion_tokens,
            },
        }
        return ProviderResponse(body, out.prompt_tokens, out.completion_tokens)

    def embed(self, model, inputs, *, timeout, request_id):
        from gpu import generate

        if model.remote_id not in OFFLINE_EMBEDDING_MODELS:
            raise ProviderCallError(
                f"{model.key} is not an offline embedding model",
                transient=False,
                reason="unknown_offline_model",
            )
        try:
            vectors, tokens = generate.embed(list(inputs))
        except (OSError, ValueError, RuntimeError) as exc:
            raise ProviderCallError(
                f"The offline embedder failed: {type(exc).__name__}: {exc}"[:500],
                transient=False,
                reason="offline_failed",
            ) from None
        body = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": vector}
                for i, vector in enumerate(vectors)
            ],
            "model": model.remote_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return ProviderResponse(body, tokens, 0)

    def list_models(self, *, timeout: float = 30.0) -> list[dict]:
        return [
            {"id": rid, "object": "model", "owned_by": "offline"} for rid in OFFLINE_CHAT_MODELS
        ] + [
            {"id": rid, "object": "model", "owned_by": "offline"}
            for rid in OFFLINE_EMBEDDING_MODELS
        ]


def _plain_messages(request: dict) -> list[dict]:
    return [
        {"role": m.get("role", "user"), "content": message_text(m.get("content"))}
        for m in request.get("messages") or []
    ]
