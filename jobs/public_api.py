"""The public, OpenAI-compatible API under /v1/ (OpenAPI at /v1/openapi.json).

A second ``config.api.CrucibleAPI`` with the same token auth (``Authorization: Bearer <Crucible
API token>``, so the ``openai`` SDK works with ``base_url=<crucible>/v1``), the same error
envelope and handlers, request ids and per-token rate limits as /api/v1/. Everything goes
through the model gateway (cache, budget, ledger, its own rate limits) via jobs/serving.py.

Roles: every signed-in role lists models and profiles; chatting, embedding and feedback spend
money or write, so they need a role that does work (engineer, analyst, admin): a viewer gets
403 there.
"""

from __future__ import annotations

import base64
import struct
import time
from decimal import Decimal
from typing import Annotated, Literal

import orjson
from django.http import HttpRequest, StreamingHttpResponse
from ninja import Schema
from pydantic import ConfigDict, Field, StringConstraints, model_validator

from config.api import CrucibleAPI, documented_errors
from config.auth import CapabilityAuth, has_capability
from config.errors import InvalidInput, PermissionDenied
from jobs import serving
from jobs.models import ChatResponse

CHAT_CAPABILITIES = ("run_jobs", "score_validations")

public_api = CrucibleAPI(
    title="Crucible OpenAI-compatible API",
    version="1-openai",
    description=(
        "OpenAI-compatible chat completions (streaming included), embeddings and models for "
        "external models, the base model and every trained adapter, plus the simpler "
        "`POST /v1/chat` and feedback. Authenticate with `Authorization: Bearer <token>` "
        "(a Crucible API token). Errors: "
        '`{"error": {"code", "message", "details", "request_id"}}`.'
    ),
    urls_namespace="public_v1",
)


class ChatAuth(CapabilityAuth):
    """Signed in (token or session) with any role that may chat."""

    def __call__(self, request: HttpRequest):
        from config.auth import _session_auth, _token_auth

        user = _token_auth(request) or _session_auth(request)
        if not user:
            return None
        if not any(has_capability(user, c) for c in CHAT_CAPABILITIES):
            raise PermissionDenied(
                "Your role may read models but not chat: chatting needs the engineer, analyst "
                "or admin role.",
                details={"required_permission": " or ".join(CHAT_CAPABILITIES)},
            )
        return user


CHAT_AUTH = [ChatAuth("run_jobs")]

# Statuses (besides config.api's common 400/401/413/422/429) each kind of route answers, listed
# in the OpenAPI document: a role that may not chat (403), an unknown model, profile or row
# (404), the budget (409), and the model provider failing, unavailable or timing out.
MODEL_CALL_ERRORS = documented_errors(403, 404, 409, 502, 503, 504)
LOOKUP_ERRORS = documented_errors(404)


# --- Schemas --------------------------------------------------------------------------------------


class Message(Schema):
    model_config = ConfigDict(extra="allow")
    role: str = Field(pattern="^(system|user|assistant|tool|developer)$")
    content: str | list[dict] | None = None


class ChatCompletionIn(Schema):
    """OpenAI's chat completion body (fields the gateway does not use are accepted and
    ignored); ``profile`` is Crucible's extension (send it with ``extra_body``)."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=270, examples=["offline/smollm2-135m-instruct"])
    messages: list[Message] = Field(min_length=1, max_length=200)
    stream: bool = False
    stream_options: dict | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=8192)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    response_format: dict | None = None
    profile: str | None = None


Text = Annotated[str, StringConstraints(min_length=1)]


class EmbeddingsIn(Schema):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=270, examples=["offline/all-minilm-l6-v2"])
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=256)] = Field(
        description="One text, or 1 to 256 texts (none of them empty)"
    )
    encoding_format: str | None = Field(default=None, pattern="^(float|base64)$")


class Controls(Schema):
    max_tokens: int | None = Field(default=None, ge=1, le=8192)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=4)
    json_output: bool | None = None


class ChatIn(Schema):
    """The seed's simple contract: a model, messages or a prompt, a profile and controls.
    Messages (at least one) or a prompt that is not blank is required."""

    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
            ]
        }
    )
    model: str = Field(min_length=1, max_length=270, examples=["offline/smollm2-135m-instruct"])
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=200)
    prompt: str | None = Field(default=None, max_length=20000, pattern=r"\S")
    profile: str | None = Field(default=None, description="name or name@vN; default balanced")
    controls: Controls = Field(default_factory=Controls)

    @model_validator(mode="after")
    def _messages_or_prompt(self):
        if not self.messages and not (self.prompt and self.prompt.strip()):
            raise ValueError("Send messages or a prompt.")
        return self


class ChatOut(Schema):
    answer: str
    model: str
    profile: str | None
    finish_reason: str
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: str
    cache_hit: bool
    request_id: str
    response_id: int
    flags: list[dict]
    regenerated: bool


class FeedbackIn(Schema):
    """At least one of a thumb, a rating, a tag or a corrected answer that is not blank."""

    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["thumb"], "properties": {"thumb": {"type": "integer"}}},
                {"required": ["rating"], "properties": {"rating": {"type": "integer"}}},
                {"required": ["tags"], "properties": {"tags": {"minItems": 1}}},
                {
                    "required": ["corrected_answer"],
                    "properties": {"corrected_answer": {"pattern": r"\S"}},
                },
            ]
        }
    )
    response_id: int
    thumb: Literal[1, -1] | None = Field(default=None, description="1 up, -1 down")
    rating: int | None = Field(default=None, ge=1, le=5, description="1-5")
    tags: list[Annotated[str, StringConstraints(min_length=1, max_length=40, pattern=r"\S")]] = (
        Field(default_factory=list, max_length=10)
    )
    corrected_answer: str = Field(default="", max_length=20000)

    @model_validator(mode="after")
    def _something_given(self):
        if (
            self.thumb is None
            and self.rating is None
            and not self.tags
            and not self.corrected_answer.strip()
        ):
            raise ValueError("Give a thumb, a rating, a tag or a corrected answer.")
        return self


class FeedbackOut(Schema):
    id: int
    response_id: int
    thumb: int | None
    rating: int | None
    tags: list[str]
    corrected_answer: str


# --- Helpers --------------------------------------------------------------------------------------


def _plain(messages: list[Message]) -> list[dict]:
    out = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append(
            {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        )
    return out


def _profile(name: str | None, *, default: str | None):
    name = name or default
    return serving.profile_get(name=name) if name else None


def _user(request: HttpRequest):
    return request.auth if hasattr(request, "auth") else request.user


def _event(data: dict) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _completion_stream(
    *, user, payload: ChatCompletionIn, controls: serving.Controls, request_id: str
) -> StreamingHttpResponse:
    """A true stream: chunks leave as the gateway's provider produces them
    (``gateway.chat_stream``: the same cache, budget, rate limits and ledger as the whole
    answer). Refusals before the first chunk are the usual error envelope; an error after it
    ends the stream with a ``data: {"error": {...}}`` event (the openai SDK raises it). The
    finish chunk carries Crucible's metadata (``crucible``: response id, cost, cache, output
    flags), sent once the answer is complete and recorded as a ChatResponse. A stream is not
    regenerated on flags: its text has already gone out."""
    from jobs import gateway

    messages = _plain(payload.messages)
    registered = serving.model_resolve(payload.model)
    if not registered.has_capability("chat"):
        raise InvalidInput(f"{registered.key} is not a chat model.")
    profile = _profile(payload.profile, default=None)
    if profile is not None:
        controls.validate(profile)
    body = serving.profile_request(profile, messages, controls)
    if registered.provider.kind != "offline" and "repetition_penalty" in body:
        body["extra_body"] = {"repetition_penalty": body.pop("repetition_penalty")}
    json_wanted = controls.json_output
    json_expected = bool(profile and profile.json_output if json_wanted is None else json_wanted)
    include_usage = bool((payload.stream_options or {}).get("include_usage"))
    try:
        stream = gateway.chat_stream(
            model=registered.key,
            request=body,
            caller=gateway.Caller(user=user, feature="chat"),
            interactive=True,
        )
    except gateway.GatewayError as exc:
        raise serving._unavailable(exc, registered.key) from None

    def events():
        text: list[str] = []
        finish_chunk = None
        usage_chunk = None
        try:
            for chunk in stream:
                if "error" in chunk:
                    yield _event(chunk)
                    return
                chunk = {**chunk, "model": registered.key}
                if chunk.get("usage") and not chunk.get("choices"):
                    usage_chunk = chunk
                    continue
                choice = (chunk.get("choices") or [{}])[0]
                text.append((choice.get("delta") or {}).get("content") or "")
                if choice.get("finish_reason"):
                    finish_chunk = chunk  # sent with the metadata once the answer is complete
                    continue
                yield _event(chunk)
        finally:
            stream.close()  # the reader went away: the gateway settles the call
        meta = stream.meta
        finish = ((finish_chunk or {}).get("choices") or [{}])[0].get("finish_reason") or "stop"
        answer = "".join(text)
        response = ChatResponse.objects.create(
            user=user if getattr(user, "is_authenticated", False) else None,
            source=ChatResponse.Source.COMPLETIONS,
            request_id=(request_id or meta.request_id)[:64],
            model_key=registered.key,
            profile=profile,
            messages=body["messages"],
            controls={
                **{k: v for k, v in body.items() if k not in ("messages", "extra_body")},
                **body.get("extra_body", {}),
            },
            answer=answer,
            finish_reason=finish,
            prompt_tokens=meta.prompt_tokens,
            completion_tokens=meta.completion_tokens,
            cost=meta.cost.quantize(Decimal("0.000001")),
            latency_ms=round(meta.latency_ms, 1),
            cached=meta.cached,
            flags=serving.answer_flags(
                text=answer,
                finish_reason=finish,
                completion_tokens=meta.completion_tokens,
                max_tokens=body.get("max_tokens"),
                target_words=profile.target_words if profile else None,
                json_expected=json_expected,
            ),
            regenerated=False,
            ledger_id=meta.ledger_id,
        )
        base = finish_chunk or {
            "id": f"chatcmpl-{response.pk}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": registered.key,
            "choices": [{"index": 0, "delta": {}, "finish_reason": finish}],
        }
        yield _event({**base, "crucible": serving.chat_response_meta(response)})
        if include_usage and usage_chunk is not None:
            yield _event(usage_chunk)
        yield b"data: [DONE]\n\n"

    response = StreamingHttpResponse(events(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


# --- Routes ---------------------------------------------------------------------------------------


@public_api.get("/models", summary="List models (OpenAI shape; adapters carry parent)")
def list_models(request: HttpRequest):
    return {"object": "list", "data": serving.models_listing()}


@public_api.get("/models/{path:model_id}", summary="One model", openapi_extra=LOOKUP_ERRORS)
def get_model(request: HttpRequest, model_id: str):
    for row in serving.models_listing():
        if row["id"] == model_id:
            return row
    from jobs import gateway

    raise gateway.UnknownModel(f"No model {model_id!r}.", details={"model": model_id})


@public_api.get("/profiles", summary="Response profiles (LP/LS), every version")
def list_profiles(request: HttpRequest):
    return {
        "object": "list",
        "data": [
            {
                "id": p.label,
                "name": p.name,
                "version": p.version,
                "title": p.title,
                "description": p.description,
                "length": {"target_words": p.target_words, "max_tokens": p.max_tokens},
                "style": {"register": p.register, "persona": p.persona},
                "decoding": {
                    "temperature": p.temperature,
                    "top_p": p.top_p,
                    "repetition_penalty": p.repetition_penalty,
                },
                "output": {"json": p.json_output, "regenerate_on_flags": p.regenerate_on_flags},
                "source_path": p.source_path,
                "checksum": p.checksum,
            }
            for p in serving.profiles_sync()
        ],
    }


@public_api.post(
    "/chat/completions",
    auth=CHAT_AUTH,
    summary="Chat completion (OpenAI shape)",
    openapi_extra=MODEL_CALL_ERRORS,
)
def chat_completions(request: HttpRequest, payload: ChatCompletionIn):
    json_wanted = (payload.response_format or {}).get("type") in ("json_object", "json_schema")
    controls = serving.Controls(
        max_tokens=payload.max_completion_tokens or payload.max_tokens,
        temperature=payload.temperature,
        top_p=payload.top_p,
        seed=payload.seed,
        stop=[payload.stop] if isinstance(payload.stop, str) else list(payload.stop or []),
        json_output=True if json_wanted else None,
    )
    if payload.stream:
        return _completion_stream(
            user=_user(request),
            payload=payload,
            controls=controls,
            request_id=getattr(request, "request_id", ""),
        )
    answer = serving.chat_respond(
        user=_user(request),
        model=payload.model,
        messages=_plain(payload.messages),
        profile=_profile(payload.profile, default=None),
        controls=controls,
        source=ChatResponse.Source.COMPLETIONS,
        request_id=getattr(request, "request_id", ""),
    )
    return answer.body


@public_api.post(
    "/embeddings",
    auth=CHAT_AUTH,
    summary="Embeddings (OpenAI shape)",
    openapi_extra=MODEL_CALL_ERRORS,
)
def embeddings(request: HttpRequest, payload: EmbeddingsIn):
    inputs = [payload.input] if isinstance(payload.input, str) else payload.input
    if not inputs or len(inputs) > 256:  # the schema says so too (EmbeddingsIn)
        raise InvalidInput("input must hold 1 to 256 texts.", details={"field": "input"})
    body = serving.embeddings_create(user=_user(request), model=payload.model, inputs=inputs)
    if payload.encoding_format == "base64":
        for row in body["data"]:
            vector = row["embedding"]
            packed = struct.pack(f"<{len(vector)}f", *vector)
            row["embedding"] = base64.b64encode(packed).decode()
    return body


@public_api.post(
    "/chat",
    auth=CHAT_AUTH,
    response=ChatOut,
    summary="Chat (the simple contract)",
    openapi_extra=MODEL_CALL_ERRORS,
)
def chat(request: HttpRequest, payload: ChatIn):
    if payload.messages:
        messages = _plain(payload.messages)
    elif payload.prompt and payload.prompt.strip():
        messages = [{"role": "user", "content": payload.prompt}]
    else:
        raise InvalidInput("Send messages or a prompt.", details={"field": "messages"})
    c = payload.controls
    answer = serving.chat_respond(
        user=_user(request),
        model=payload.model,
        messages=messages,
        profile=_profile(payload.profile, default=serving.DEFAULT_PROFILE),
        controls=serving.Controls(
            max_tokens=c.max_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
            seed=c.seed,
            stop=c.stop,
            json_output=c.json_output,
        ),
        source=ChatResponse.Source.CHAT,
        request_id=getattr(request, "request_id", ""),
    )
    r = answer.response
    return {
        "answer": r.answer,
        "model": r.model_key,
        "profile": r.profile.label if r.profile_id else None,
        "finish_reason": r.finish_reason,
        "latency_ms": r.latency_ms,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.total_tokens,
        "cost": format(r.cost, "f"),
        "cache_hit": r.cached,
        "request_id": r.request_id,
        "response_id": r.pk,
        "flags": r.flags,
        "regenerated": r.regenerated,
    }


@public_api.post(
    "/feedback",
    auth=CHAT_AUTH,
    response={201: FeedbackOut},
    summary="Feedback",
    openapi_extra=documented_errors(403, 404),
)
def feedback(request: HttpRequest, payload: FeedbackIn):
    response = ChatResponse.objects.filter(pk=payload.response_id).first()
    if response is None:
        from config.errors import NotFound

        raise NotFound("No such response.", details={"response_id": payload.response_id})
    item = serving.feedback_create(
        response=response,
        user=_user(request),
        thumb=payload.thumb,
        rating=payload.rating,
        tags=payload.tags,
        corrected_answer=payload.corrected_answer,
    )
    return 201, item
