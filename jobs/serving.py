"""Serving: answers through the model gateway with response profiles and output validation,
the model server as a gateway provider, adapters registered when their job completes, and
feedback that becomes training data.

- Response profiles ("LP/LS"): files jobs/profiles/<name>.v<version>.yaml, validated and mirrored
  into ResponseProfile rows (``profiles_sync``); LP = length preference (target words, max
  tokens), LS = language style (register, persona/system prompt).
- ``chat_respond`` answers one conversation through ``jobs.gateway.chat`` (cache, budget,
  ledger, rate limits), validates the answer (``answer_flags``), regenerates once when the
  profile asks, and records a ChatResponse.
- The model server (gpu/serve.py, or vLLM, or any OpenAI-compatible endpoint) is the provider
  ``crucible-server`` at ``MODEL_SERVER_URL`` (``model_server_provider_sync``).
- Feedback rows become a versioned training file through corpora's validator
  (``feedback_training_file_create``) and a Smoke job (``feedback_training_job_start``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import orjson
import yaml
from django.db import transaction
from django.db.models import Avg, Count, Q
from django.utils import timezone
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from config.errors import CrucibleError, InvalidInput, NotFound
from jobs.models import (
    ChatResponse,
    Feedback,
    FeedbackTrainingFile,
    Provider,
    RegisteredModel,
    ResponseProfile,
)

logger = logging.getLogger("crucible.serving")

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
PROFILE_FILE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9-]*)\.v(?P<version>[1-9][0-9]*)\.ya?ml$")
DEFAULT_PROFILE = "balanced"
MODEL_SERVER_SLUG = "crucible-server"
DEFAULT_MODEL_SERVER_URL = "http://127.0.0.1:8765/v1"


class ModelUnavailable(CrucibleError):
    status_code = 503
    code = "model_unavailable"
    default_message = "The model runtime is not reachable; try again shortly."


# --- Profiles -------------------------------------------------------------------------------------


class _Length(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target_words: int = Field(ge=1, le=4000)
    max_tokens: int = Field(ge=1, le=8192)


class _Style(BaseModel):
    model_config = ConfigDict(extra="forbid")
    register_: Literal["neutral", "formal", "casual", "technical"] = Field(alias="register")
    persona: str = Field(default="", max_length=4000)


class _Decoding(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    repetition_penalty: float = Field(default=1.0, ge=0.5, le=2)


class _Output(BaseModel):
    model_config = ConfigDict(extra="forbid")
    json_: bool = Field(default=False, alias="json")
    regenerate_on_flags: bool = False


class ProfileSpec(BaseModel):
    """The schema of a profile file."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=64)
    version: int = Field(ge=1)
    title: str = Field(min_length=1, max_length=120)
    description: str = ""
    length: _Length
    style: _Style
    decoding: _Decoding = _Decoding()
    output: _Output = _Output()

    @field_validator("length")
    @classmethod
    def _target_fits(cls, value: _Length) -> _Length:
        # a word is at least about one token: a target beyond the limit cannot be met
        if value.target_words > value.max_tokens:
            raise ValueError("target_words must not exceed max_tokens")
        return value


def profile_spec_load(path: Path) -> tuple[ProfileSpec, str]:
    """The validated spec in ``path`` and the file's sha256; InvalidInput names the problem."""
    raw = path.read_bytes()
    match = PROFILE_FILE.match(path.name)
    if match is None:
        raise InvalidInput(f"{path.name}: a profile file is named <name>.v<version>.yaml")
    try:
        data = yaml.safe_load(raw)
        spec = ProfileSpec.model_validate(data)
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{path.name}: not YAML ({exc})") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise InvalidInput(f"{path.name}: {problems}") from None
    if spec.name != match["name"] or spec.version != int(match["version"]):
        raise InvalidInput(f"{path.name}: name/version inside differ from the file name")
    return spec, hashlib.sha256(raw).hexdigest()


_synced: dict[str, Any] = {"stamp": None}
_sync_lock = threading.Lock()


def profiles_sync(*, directory: Path | None = None, force: bool = False) -> list[ResponseProfile]:
    """Mirror every profile file into ResponseProfile rows (new versions created; a version
    already used by responses is never changed: editing it is an error, make a new version)."""
    directory = directory or PROFILE_DIR
    files = sorted(directory.glob("*.y*ml"))
    stamp = (str(directory), tuple((p.name, p.stat().st_mtime_ns) for p in files))
    with _sync_lock:
        rows = list(ResponseProfile.objects.all())
        # the files are unchanged since the last sync and their rows are there (a rolled-back
        # transaction, in tests, can take rows away behind the stamp)
        if not force and _synced["stamp"] == stamp and len(rows) >= len(files):
            return rows
        for path in files:
            spec, checksum = profile_spec_load(path)
            values = {
                "title": spec.title,
                "description": spec.description,
                "target_words": spec.length.target_words,
                "max_tokens": spec.length.max_tokens,
                "register": spec.style.register_,
                "persona": spec.style.persona.strip(),
                "temperature": spec.decoding.temperature,
                "top_p": spec.decoding.top_p,
                "repetition_penalty": spec.decoding.repetition_penalty,
                "json_output": spec.output.json_,
                "regenerate_on_flags": spec.output.regenerate_on_flags,
                "source_path": f"jobs/profiles/{path.name}",
                "checksum": checksum,
            }
            row = ResponseProfile.objects.filter(name=spec.name, version=spec.version).first()
            if row is None:
                ResponseProfile.objects.create(name=spec.name, version=spec.version, **values)
            elif row.checksum != checksum:
                if row.responses.exists():
                    raise InvalidInput(
                        f"{path.name} changed after responses used it: give the change a new "
                        f"version ({spec.name}.v{spec.version + 1}.yaml)."
                    )
                ResponseProfile.objects.filter(pk=row.pk).update(**values)
        _synced["stamp"] = stamp
    return list(ResponseProfile.objects.all())


def profile_get(*, name: str | None, version: int | None = None) -> ResponseProfile:
    """The profile ``name`` at ``version`` (latest when None); 'name@v2' also accepted."""
    profiles_sync()
    name = name or DEFAULT_PROFILE
    if "@" in name and version is None:
        name, _, tail = name.partition("@")
        try:
            version = int(tail.lstrip("v"))
        except ValueError:
            raise InvalidInput(f"Unknown profile version {tail!r}") from None
    qs = ResponseProfile.objects.filter(name=name)
    if version is not None:
        qs = qs.filter(version=version)
    profile = qs.order_by("-version").first()
    if profile is None:
        known = sorted(set(ResponseProfile.objects.values_list("name", flat=True)))
        raise NotFound(
            f"No response profile {name!r}" + (f" version {version}" if version else ""),
            details={"profiles": known},
        )
    return profile


REGISTER_HINTS = {
    "neutral": "Use a neutral, plain register.",
    "formal": "Use a formal register: complete sentences, no slang or contractions.",
    "casual": "Use a friendly, casual register.",
    "technical": "Use precise technical language.",
}


def profile_system_prompt(profile: ResponseProfile) -> str:
    parts = [profile.persona] if profile.persona else []
    parts.append(REGISTER_HINTS[profile.register])
    parts.append(f"Aim for about {profile.target_words} words.")
    if profile.json_output:
        parts.append("Reply with valid JSON only.")
    return " ".join(parts)


@dataclass
class Controls:
    """Per-request decoding settings; None takes the profile's."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    json_output: bool | None = None

    def validate(self, profile: ResponseProfile) -> None:
        if self.max_tokens is not None and not 1 <= self.max_tokens <= profile.max_tokens:
            raise InvalidInput(
                f"max_tokens must be between 1 and the profile's limit {profile.max_tokens}.",
                details={"field": "max_tokens", "limit": profile.max_tokens},
            )
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise InvalidInput("temperature must be between 0 and 2.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InvalidInput("top_p must be in (0, 1].")


def profile_request(
    profile: ResponseProfile | None, messages: list[dict], controls: Controls
) -> dict:
    """The gateway request body: the profile's system prompt first (the caller's own system
    message after it) and the decoding settings."""
    body: dict[str, Any] = {"messages": list(messages)}
    if profile is not None:
        system = {"role": "system", "content": profile_system_prompt(profile)}
        rest = list(messages)
        if rest and rest[0].get("role") == "system":
            system["content"] = f"{system['content']}\n\n{rest.pop(0).get('content') or ''}"
        body["messages"] = [system, *rest]
        body |= {
            "max_tokens": controls.max_tokens or profile.max_tokens,
            "temperature": profile.temperature if controls.temperature is None else None,
            "top_p": profile.top_p,
            "repetition_penalty": profile.repetition_penalty,
        }
        if controls.temperature is not None:
            body["temperature"] = controls.temperature
        if controls.top_p is not None:
            body["top_p"] = controls.top_p
    else:
        for name in ("max_tokens", "temperature", "top_p"):
            value = getattr(controls, name)
            if value is not None:
                body[name] = value
    body["seed"] = 0 if controls.seed is None else controls.seed
    if controls.stop:
        body["stop"] = controls.stop
    return body


# --- Output validation ----------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _degenerate(text: str) -> bool:
    """A looping answer: few distinct word trigrams, or one line said three times or more.
    (A hand-written check: the libraries for this are whole generation-quality suites.)"""
    words = _words(text)
    if len(words) >= 15:
        trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
        if len(set(trigrams)) / len(trigrams) < 0.5:
            return True
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) > 3]
    return any(lines.count(line) >= 3 for line in set(lines))


def answer_flags(
    *,
    text: str,
    finish_reason: str,
    completion_tokens: int,
    max_tokens: int | None,
    target_words: int | None,
    json_expected: bool,
) -> list[dict]:
    """Output validation of one answer: a list of {"code", "message"} (empty: all good)."""
    flags: list[dict] = []
    if not text.strip():
        flags.append({"code": "empty", "message": "The answer is empty."})
    if finish_reason == "length" or (max_tokens and completion_tokens >= max_tokens):
        flags.append(
            {
                "code": "truncated",
                "message": f"The answer stopped at the length limit ({max_tokens} tokens).",
            }
        )
    if _degenerate(text):
        flags.append({"code": "repetition", "message": "The answer repeats itself."})
    words = len(_words(text))
    if target_words and words > 2 * target_words:
        flags.append(
            {
                "code": "over_length",
                "message": f"{words} words, over twice the profile's target of {target_words}.",
            }
        )
    if json_expected and text.strip():
        candidate = text.strip()
        fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", candidate, re.S)
        try:
            orjson.loads((fenced.group(1) if fenced else candidate).encode())
        except orjson.JSONDecodeError:
            flags.append({"code": "invalid_json", "message": "JSON was asked for; this is not."})
    elif json_expected:
        flags.append(
            {"code": "invalid_json", "message": "JSON was asked for; the answer is empty."}
        )
    return flags


# --- Answering ------------------------------------------------------------------------------------


def model_resolve(key: str) -> RegisteredModel:
    """A chat model by key, or by a bare remote id when exactly one provider has it."""
    from jobs import gateway

    qs = gateway.models(capability=None, enabled_only=False)
    model = qs.filter(key=key).first()
    if model is None and "/" not in key:
        matches = list(qs.filter(remote_id=key)[:2])
        model = matches[0] if len(matches) == 1 else None
    if model is None:
        raise gateway.UnknownModel(
            f"No model {key!r}: GET /v1/models lists them.", details={"model": key}
        )
    return model


def _unavailable(exc, model_key: str) -> CrucibleError:
    """A provider that cannot be reached is the runtime being down: 503 with the reason."""
    from jobs import gateway

    if isinstance(exc, gateway.ProviderError | gateway.CircuitOpen | gateway.DeadlineExceeded) and (
        exc.transient
    ):
        provider = (exc.details or {}).get("provider", "")
        where = ""
        row = Provider.objects.filter(slug=provider).only("base_url").first()
        if row is not None and row.base_url:
            label = "the model server" if provider == MODEL_SERVER_SLUG else provider
            where = f" ({label} at {row.base_url})"
        error = ModelUnavailable(
            f"The model runtime for {model_key}{where} is not reachable: {exc.message}",
            details={**(exc.details or {}), "model": model_key},
        )
        error.retry_after = exc.retry_after or 5
        return error
    return exc


@dataclass
class Answer:
    response: ChatResponse
    body: dict  # the OpenAI-shaped ChatCompletion


def chat_respond(
    *,
    user,
    model: str,
    messages: list[dict],
    profile: ResponseProfile | None,
    controls: Controls,
    source: str,
    request_id: str = "",
) -> Answer:
    """One answer through the gateway, validated (one regeneration when the profile asks),
    recorded as a ChatResponse."""
    from jobs import gateway

    if not messages:
        raise InvalidInput("Send messages or a prompt.")
    registered = model_resolve(model)
    if not registered.has_capability("chat"):
        raise InvalidInput(f"{registered.key} is not a chat model.")
    if profile is not None:
        controls.validate(profile)
    body = profile_request(profile, messages, controls)
    if registered.provider.kind != Provider.Kind.OFFLINE and "repetition_penalty" in body:
        # not an OpenAI parameter: the SDK sends it as an extra body field (vLLM reads it)
        body["extra_body"] = {"repetition_penalty": body.pop("repetition_penalty")}
    json_expected = bool(
        controls.json_output
        if controls.json_output is not None
        else profile and profile.json_output
    )
    caller = gateway.Caller(user=user, feature="chat")
    started = time.perf_counter()
    regenerated = False
    try:
        result = gateway.chat(model=registered.key, request=body, caller=caller, interactive=True)
        finish = (result.response.get("choices") or [{}])[0].get("finish_reason") or ""
        flags = answer_flags(
            text=result.text,
            finish_reason=finish,
            completion_tokens=result.meta.completion_tokens,
            max_tokens=body.get("max_tokens"),
            target_words=profile.target_words if profile else None,
            json_expected=json_expected,
        )
        cost = result.meta.cost
        if flags and profile is not None and profile.regenerate_on_flags:
            retry_body = {**body, "seed": int(body["seed"]) + 1}
            if any(f["code"] == "repetition" for f in flags) and "extra_body" not in body:
                retry_body["repetition_penalty"] = max(1.2, body.get("repetition_penalty", 1.0))
            retry = gateway.chat(
                model=registered.key, request=retry_body, caller=caller, run_index=1
            )
            retry_finish = (retry.response.get("choices") or [{}])[0].get("finish_reason") or ""
            retry_flags = answer_flags(
                text=retry.text,
                finish_reason=retry_finish,
                completion_tokens=retry.meta.completion_tokens,
                max_tokens=retry_body.get("max_tokens"),
                target_words=profile.target_words,
                json_expected=json_expected,
            )
            cost += retry.meta.cost
            regenerated = True
            if len(retry_flags) <= len(flags):
                result, finish, flags, body = retry, retry_finish, retry_flags, retry_body
    except gateway.GatewayError as exc:
        raise _unavailable(exc, registered.key) from None
    latency = (time.perf_counter() - started) * 1000
    meta = result.meta
    response = ChatResponse.objects.create(
        user=user if getattr(user, "is_authenticated", False) else None,
        source=source,
        request_id=(request_id or meta.request_id)[:64],
        model_key=registered.key,
        profile=profile,
        messages=body["messages"],
        controls={
            **{k: v for k, v in body.items() if k not in ("messages", "extra_body")},
            **body.get("extra_body", {}),
        },
        answer=result.text,
        finish_reason=finish,
        prompt_tokens=meta.prompt_tokens,
        completion_tokens=meta.completion_tokens,
        cost=Decimal(cost).quantize(Decimal("0.000001")),
        latency_ms=round(meta.latency_ms if meta.cached else latency, 1),
        cached=meta.cached,
        flags=flags,
        regenerated=regenerated,
        ledger_id=meta.ledger_id,
    )
    out = dict(result.response)
    out["model"] = registered.key
    out["crucible"] = chat_response_meta(response)
    return Answer(response=response, body=out)


def chat_response_meta(response: ChatResponse) -> dict:
    return {
        "response_id": response.pk,
        "request_id": response.request_id,
        "profile": response.profile.label if response.profile_id else None,
        "latency_ms": response.latency_ms,
        "cached": response.cached,
        "cost": format(response.cost, "f"),
        "flags": response.flags,
        "regenerated": response.regenerated,
    }


def embeddings_create(*, user, model: str, inputs: list[str]) -> dict:
    from jobs import gateway

    registered = model_resolve(model)
    try:
        result = gateway.embed(
            model=registered.key, input=inputs, caller=gateway.Caller(user=user, feature="rag")
        )
    except gateway.GatewayError as exc:
        raise _unavailable(exc, registered.key) from None
    out = dict(result.response)
    out["model"] = registered.key
    return out


def models_listing() -> list[dict]:
    """The enabled registry in OpenAI's model-list shape (adapters with ``parent``)."""
    from jobs import gateway

    rows = []
    for m in gateway.models(enabled_only=True).order_by("provider__slug", "key"):
        rows.append(
            {
                "id": m.key,
                "object": "model",
                "created": int(m.created_at.timestamp()),
                "owned_by": m.provider.slug,
                "parent": m.parent or None,
                "root": m.parent or m.key,
                "capabilities": list(m.capabilities or []),
                "display_name": m.display_name or m.key,
                "context_length": m.context_length,
                "revision": m.revision or None,
            }
        )
    return rows


# --- The model server as a provider ---------------------------------------------------------------


def model_server_url() -> str:
    from django.conf import settings

    return (
        getattr(settings, "MODEL_SERVER_URL", "")
        or os.environ.get("MODEL_SERVER_URL", "")
        or DEFAULT_MODEL_SERVER_URL
    ).rstrip("/")


def model_server_provider_sync(*, base_url: str | None = None, refresh: bool = True) -> Provider:
    """The ``crucible-server`` provider row at ``base_url`` (MODEL_SERVER_URL by default) and,
    with ``refresh``, its models from the server's /v1/models (the registry refresh).
    Any OpenAI-compatible server fits: gpu/serve.py, ``vllm serve BASE --enable-lora``,
    a RunPod serverless vLLM endpoint."""
    url = (base_url or model_server_url()).rstrip("/")
    provider, _ = Provider.objects.update_or_create(
        slug=MODEL_SERVER_SLUG,
        defaults={"name": "Crucible model server", "kind": Provider.Kind.OPENAI, "base_url": url},
    )
    if refresh:
        from jobs.services import provider_models_list, registry_refresh

        (report,) = registry_refresh(provider=provider)
        if report.error:
            raise ModelUnavailable(
                f"The model server at {url} did not list its models: {report.error}",
                details={"provider": MODEL_SERVER_SLUG},
            )
        # A model server of our own costs nothing per token: its new (unpriced) models are
        # priced 0 and enabled; adapters get their base as parent (vLLM's "parent" field).
        RegisteredModel.objects.filter(
            provider=provider, price_input_per_m__isnull=True, price_source=""
        ).update(
            price_input_per_m=Decimal(0),
            price_output_per_m=Decimal(0),
            price_source="local",
            enabled=True,
        )
        for remote in provider_models_list(provider=provider):
            parent = remote.extra.get("parent")
            if parent:
                RegisteredModel.objects.filter(provider=provider, remote_id=remote.id).update(
                    parent=f"{MODEL_SERVER_SLUG}/{parent}"
                )
    return provider


def model_runtime_status() -> dict:
    """/readyz's "model_runtime": the in-process offline runtime and, when configured, the
    model server (its /health, one short request)."""
    import urllib.error
    import urllib.request

    from gpu import generate

    status: dict[str, Any] = {
        "offline": {
            "state": "loaded" if generate._loaded else "loads on first use",
            "models": [Path(k[0]).name + (" + adapter" if k[1] else "") for k in generate._loaded],
        }
    }
    from django.conf import settings

    # The configured address first (no database needed: /readyz asks from its own threads).
    url = getattr(settings, "MODEL_SERVER_URL", "") or os.environ.get("MODEL_SERVER_URL", "")
    if not url:
        provider = Provider.objects.filter(slug=MODEL_SERVER_SLUG, enabled=True).first()
        url = provider.base_url if provider is not None else ""
    if not url:
        status["server"] = {"state": "not configured", "detail": "MODEL_SERVER_URL unset"}
        return status
    url = url.rstrip("/")
    health = url.removesuffix("/v1") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=1.5) as answer:  # noqa: S310 (admin URL)
            info = orjson.loads(answer.read())
        status["server"] = {"state": "up", "url": url, "health": info}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        status["server"] = {
            "state": "down",
            "url": url,
            "detail": f"{health} did not answer: {getattr(exc, 'reason', exc)}",
        }
    return status


# --- Adapters on job completion -------------------------------------------------------------------


def adapter_register_on_completion(*, job_id) -> RegisteredModel | None:
    """Register the completed job's adapter in the gateway registry (never raises: a job
    without an adapter artifact is logged and skipped)."""
    from jobs.services import adapter_model_register
    from training.models import TrainingJob

    job = TrainingJob.objects.filter(pk=job_id).first()
    if job is None:
        return None
    try:
        with transaction.atomic():  # a savepoint: a failed registration leaves the rest intact
            model = adapter_model_register(job=job)
    except Exception:
        logger.exception("adapter of job %s not registered", job_id)
        return None
    logger.info("adapter of job %s registered as %s", job_id, model.key)
    return model


def on_job_transition(sender, instance, created, **kwargs) -> None:
    """post_save of training.JobTransition: a job that became completed gets its adapter
    registered in the same transaction (its adapter artifact is stored before the transition),
    so whoever sees the job completed also finds its model in /v1/models. Registered after
    the commit instead, a client polling the job could list the models in between (seen: the
    listing 2 ms before the registration)."""
    if created and instance.to_status == "completed":
        adapter_register_on_completion(job_id=instance.job_id)


# --- Feedback -------------------------------------------------------------------------------------

FEEDBACK_TAGS = (
    "accurate",
    "helpful",
    "wrong",
    "off-topic",
    "too-long",
    "too-short",
    "unsafe",
    "style",
    "repetitive",
)


def feedback_create(
    *,
    response: ChatResponse,
    user,
    thumb: int | None = None,
    rating: int | None = None,
    tags: list[str] | None = None,
    corrected_answer: str = "",
) -> Feedback:
    tags = [t.strip().lower() for t in (tags or []) if t and t.strip()]
    if thumb is None and rating is None and not tags and not corrected_answer.strip():
        raise InvalidInput("Give a thumb, a rating, a tag or a corrected answer.")
    if thumb is not None and thumb not in (-1, 1):
        raise InvalidInput("thumb must be 1 (up) or -1 (down).", details={"field": "thumb"})
    if rating is not None and not 1 <= rating <= 5:
        raise InvalidInput("rating must be between 1 and 5.", details={"field": "rating"})
    if len(tags) > 10 or any(len(t) > 40 for t in tags):
        raise InvalidInput("At most 10 tags of up to 40 characters.", details={"field": "tags"})
    if len(corrected_answer) > 20000:
        raise InvalidInput("The corrected answer is over 20,000 characters.")
    return Feedback.objects.create(
        response=response,
        user=user if getattr(user, "is_authenticated", False) else None,
        thumb=thumb,
        rating=rating,
        tags=sorted(set(tags)),
        corrected_answer=corrected_answer.strip(),
    )


def feedback_summary(*, days: int = 30) -> dict:
    """Ratings and tag counts per model and per day, and the worst-rated examples."""
    since = timezone.now() - timezone.timedelta(days=days)
    rows = Feedback.objects.filter(created_at__gte=since)
    per_model = list(
        rows.values("response__model_key")
        .annotate(
            count=Count("id"),
            avg_rating=Avg("rating"),
            up=Count("id", filter=Q(thumb=1)),
            down=Count("id", filter=Q(thumb=-1)),
            corrected=Count("id", filter=~Q(corrected_answer="")),
        )
        .order_by("response__model_key")
    )
    from django.db.models.functions import TruncDate

    per_day = list(
        rows.annotate(day=TruncDate("created_at"))
        .values("day", "response__model_key")
        .annotate(count=Count("id"), avg_rating=Avg("rating"))
        .order_by("day", "response__model_key")
    )
    tag_counts: dict[str, dict[str, int]] = {}
    for model_key, tags in rows.values_list("response__model_key", "tags"):
        for tag in tags or []:
            tag_counts.setdefault(model_key, {}).setdefault(tag, 0)
            tag_counts[model_key][tag] += 1
    worst = list(
        rows.filter(Q(rating__isnull=False) | Q(thumb=-1))
        .select_related("response", "response__profile")
        .order_by("rating", "thumb", "-created_at")[:10]
    )
    return {"per_model": per_model, "per_day": per_day, "tags": tag_counts, "worst": worst}


def feedback_conversation(item: Feedback) -> dict | None:
    """The conversation a feedback row teaches: its corrected answer, or the answer itself
    when rated 4-5 or thumbed up (and not corrected); None when it teaches nothing."""
    if item.corrected_answer:
        answer = item.corrected_answer
    elif (item.rating or 0) >= 4 or (item.thumb == 1 and (item.rating or 5) >= 4):
        answer = item.response.answer
    else:
        return None
    if not answer.strip():
        return None
    messages = [
        {"role": m["role"], "content": m.get("content") or ""}
        for m in item.response.messages
        if m.get("role") in ("system", "user", "assistant")
    ]
    return {
        "id": f"feedback-{item.pk}",
        "messages": [*messages, {"role": "assistant", "content": answer}],
    }


def feedback_training_file_create(*, feedback_ids: list[int], user, name: str = ""):
    """A training file (Crucible schema) from the chosen feedback, through corpora's validator;
    the next version of the feedback series, with its lineage to the feedback rows."""
    from corpora.services import training_file_create

    items = list(
        Feedback.objects.filter(pk__in=feedback_ids).select_related("response").order_by("pk")
    )
    missing = set(feedback_ids) - {f.pk for f in items}
    if missing:
        raise NotFound("Unknown feedback ids.", details={"missing": sorted(missing)})
    conversations = [c for c in (feedback_conversation(f) for f in items) if c]
    used = [f for f in items if feedback_conversation(f)]
    if not conversations:
        raise InvalidInput(
            "None of the chosen feedback has a corrected answer or a rating of 4-5.",
            details={"feedback": feedback_ids},
        )
    payload = b"".join(orjson.dumps(c) + b"\n" for c in conversations)
    with transaction.atomic():
        version = FeedbackTrainingFile.objects.select_for_update().order_by("-version").first()
        version = (version.version if version else 0) + 1
        training_file = training_file_create(
            name=name or f"Feedback v{version}",
            upload=io.BytesIO(payload),
            user=user,
            filename=f"feedback-v{version}.jsonl",
            description=f"{len(conversations)} conversations from feedback "
            f"{', '.join(str(f.pk) for f in used)}",
        )
        lineage = FeedbackTrainingFile.objects.create(
            training_file=training_file, version=version, created_by=user
        )
        lineage.feedback.set(used)
    return lineage


def feedback_training_job_start(*, lineage: FeedbackTrainingFile, user, start: bool = True):
    """A Smoke training job on the feedback file, on the offline base model (training's own
    create and start services: budget checks and the queue as for any job)."""
    from training.models import BaseModel as TrainingBase
    from training.models import Preset
    from training.services import training_job_create, training_job_start

    base = TrainingBase.objects.filter(source=TrainingBase.Source.OFFLINE, is_active=True).first()
    preset = Preset.objects.filter(key="smoke").first()
    if base is None or preset is None:
        raise InvalidInput("The offline base model or the Smoke preset is missing (migrate).")
    job = training_job_create(
        user=user,
        training_file=lineage.training_file,
        base_model=base,
        name=f"Feedback v{lineage.version} (smoke)",
        preset=preset,
        description="Smoke training on a training file made from chat feedback.",
        tags=["feedback"],
    )
    if start:
        training_job_start(job=job, user=user)
    return job
