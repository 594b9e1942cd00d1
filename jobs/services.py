"""Workflows of the model gateway's registry: providers, their models and the gateway's settings.

The calls themselves go through ``jobs.gateway`` (chat, embeddings, retries, breakers, cache,
budget, ledger). This module keeps the registry that the gateway reads up to date:

- ``registry_refresh`` lists each enabled OpenAI-compatible provider's ``GET /v1/models``
  through the ``openai`` SDK and adds, updates and marks models. A new model is **enabled when
  it has a price** (from the provider's own listing or the ``genai-prices`` table), so that its
  spend can be held to the budget; an unpriced one is added disabled and flagged, and is usable
  only once an admin enables it and ticks ``allow_unpriced``. A model that is no longer listed
  is marked (its ``last_seen_at`` stays behind the provider's newest) and never deleted, since
  the ledger and old results name it.
- ``provider_*`` create/update/delete/test providers; API keys are stored encrypted
  (``Provider.set_api_key``) and never returned.
- ``adapter_model_register`` puts a training job's LoRA adapter into the registry as an offline
  model on top of its base, so that the playground (and later features) call it by key.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from config.errors import Conflict, InvalidInput
from jobs.models import GatewaySettings, Provider, RegisteredModel

logger = logging.getLogger("crucible.jobs")

PRICE_TABLE_PACKAGE = "genai-prices"
MILLION = Decimal(1_000_000)
# Words in a model id that mark an embedding model (the /v1/models listing does not say).
EMBEDDING_HINTS = ("embed", "minilm", "bge-", "/bge", "e5-", "gte-", "nomic-embed")


# --- Prices ---------------------------------------------------------------------------------


def _decimal(value: Any) -> Decimal | None:
    if value is None or value == "":
        return None
    try:
        number = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return number if number >= 0 else None


def _listing_price(extra: dict) -> tuple[Decimal, Decimal, str] | None:
    """A price the provider's own /v1/models entry carries, in $ per million tokens.

    The Hugging Face router lists ``providers: [{provider, status, context_length,
    pricing: {input, output}}]`` in $/M; OpenRouter lists ``pricing: {prompt, completion}`` in
    $ per token. Several router back-ends: the dearest live one (worst case for the budget).
    """
    routes = [p for p in extra.get("providers") or [] if isinstance(p, dict)]
    priced = []
    for route in routes:
        pricing = route.get("pricing") or {}
        if route.get("status", "live") != "live" or not isinstance(pricing, dict):
            continue
        pin, pout = _decimal(pricing.get("input")), _decimal(pricing.get("output"))
        if pin is not None and pout is not None:
            priced.append((pin, pout))
    if priced:
        return max(p[0] for p in priced), max(p[1] for p in priced), "provider:listing"
    pricing = extra.get("pricing")
    if isinstance(pricing, dict):
        pin, pout = _decimal(pricing.get("prompt")), _decimal(pricing.get("completion"))
        if pin is not None and pout is not None:
            return pin * MILLION, pout * MILLION, "provider:listing"
    return None


def price_lookup(*, provider: Provider, remote_id: str) -> tuple[Decimal, Decimal, str] | None:
    """($ per 1M input tokens, $ per 1M output tokens, source) from the ``genai-prices``
    table (pydantic's maintained price data, no network at run time), matched by the provider's
    base URL and the model id; ``None`` when the table does not know the pair.

    A Hugging Face router id with a ``:backend`` suffix is matched against that back-end's
    prices (the table lists them as ``huggingface_<backend>``).
    """
    from genai_prices import Usage, calc_price

    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    attempts: list[dict] = []
    model_ref = remote_id
    if "router.huggingface.co" in (provider.base_url or "") and ":" in remote_id:
        model_ref, backend = remote_id.rsplit(":", 1)
        attempts.append({"provider_id": f"huggingface_{backend}"})
    if provider.base_url:
        attempts.append({"provider_api_url": provider.base_url})
    for kwargs in attempts:
        try:
            result = calc_price(usage, model_ref, **kwargs)
        except LookupError:
            continue
        except Exception:  # a malformed table entry must not break a refresh
            logger.warning("price table lookup failed for %s", remote_id, exc_info=True)
            continue
        return (
            Decimal(str(result.input_price)),
            Decimal(str(result.output_price)),
            f"table:{PRICE_TABLE_PACKAGE}",
        )
    return None


def _context_length(extra: dict) -> int | None:
    """The context length when the listing reports one (vLLM ``max_model_len``, OpenRouter and
    Together ``context_length``, the HF router per back-end)."""
    for name in ("context_length", "max_model_len", "context_window", "max_context_length"):
        value = extra.get(name)
        if isinstance(value, int) and value > 0:
            return value
    lengths = [
        p.get("context_length")
        for p in extra.get("providers") or []
        if isinstance(p, dict) and isinstance(p.get("context_length"), int)
    ]
    return min(lengths) if lengths else None  # the smallest back-end's is safe for all


def _capabilities(remote_id: str, extra: dict) -> list[str]:
    declared = extra.get("capabilities")
    if isinstance(declared, list) and all(isinstance(c, str) for c in declared) and declared:
        return sorted({c for c in declared if c in ("chat", "embeddings")}) or ["chat"]
    lowered = remote_id.lower()
    return ["embeddings"] if any(h in lowered for h in EMBEDDING_HINTS) else ["chat"]


# --- Listing a provider's models ---------------------------------------------------------------


@dataclass
class RemoteModel:
    id: str
    extra: dict = field(default_factory=dict)


def provider_models_list(
    *, provider: Provider, timeout_s: float | None = None
) -> list[RemoteModel]:
    """The provider's ``GET /v1/models`` through the gateway's provider class (one attempt, the
    ``openai`` SDK for OpenAI-compatible endpoints). Raises ``jobs.gateway.ProviderError`` with
    a readable message (the key redacted) on failure."""
    from jobs.gateway.errors import ProviderError
    from jobs.gateway.providers import ProviderCallError, provider_for

    if provider.kind == Provider.Kind.OPENAI and not provider.base_url:
        raise InvalidInput(f"Provider {provider.slug} has no base URL.")
    timeout = timeout_s or provider.timeout_s or GatewaySettings.load().effective()["timeout_s"]
    try:
        listed = provider_for(provider).list_models(timeout=float(timeout))
    except ProviderCallError as exc:
        raise ProviderError(
            exc.message,
            transient=exc.transient,
            retry_after=exc.retry_after,
            details={"provider": provider.slug, "status": exc.status, "reason": exc.reason},
        ) from None
    return [RemoteModel(str(m["id"]), {k: v for k, v in m.items() if k != "id"}) for m in listed]


# --- Refresh -----------------------------------------------------------------------------------


@dataclass
class RefreshReport:
    provider: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    unpriced: list[str] = field(default_factory=list)
    error: str = ""

    def as_dict(self) -> dict:
        return {
            "provider": self.provider,
            "added": self.added,
            "updated": self.updated,
            "vanished": self.vanished,
            "unpriced": self.unpriced,
            "error": self.error,
        }


def _refresh_one(provider: Provider) -> RefreshReport:
    report = RefreshReport(provider=provider.slug)
    try:
        listed = provider_models_list(provider=provider)
    except Exception as exc:  # one failing provider must not stop the others
        report.error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        logger.warning("model refresh of %s failed: %s", provider.slug, report.error)
        return report
    now = timezone.now()
    existing = {m.remote_id: m for m in provider.models.all()}
    with transaction.atomic():
        for remote in listed:
            model = existing.get(remote.id)
            listing_price = _listing_price(remote.extra)
            price = listing_price or price_lookup(provider=provider, remote_id=remote.id)
            context = _context_length(remote.extra)
            if model is None:
                model = RegisteredModel(
                    provider=provider,
                    remote_id=remote.id,
                    key=f"{provider.slug}/{remote.id}",
                    display_name=remote.id.rsplit("/", 1)[-1],
                    capabilities=_capabilities(remote.id, remote.extra),
                    context_length=context,
                    enabled=price is not None,
                    last_seen_at=now,
                )
                if price:
                    model.price_input_per_m, model.price_output_per_m, model.price_source = price
                else:
                    report.unpriced.append(model.key)
                model.save()
                report.added.append(model.key)
                continue
            changed = []
            if context and model.context_length != context:
                model.context_length = context
                changed.append("context_length")
            # An admin's price stands; table/listing prices follow the source.
            if price and model.price_source != "admin":
                pin, pout, source = price
                if (model.price_input_per_m, model.price_output_per_m, model.price_source) != (
                    pin,
                    pout,
                    source,
                ):
                    model.price_input_per_m, model.price_output_per_m = pin, pout
                    model.price_source = source
                    changed.append("price")
            if not model.is_priced:
                report.unpriced.append(model.key)
            model.last_seen_at = now
            model.save()
            if changed:
                report.updated.append(model.key)
        if provider.kind != Provider.Kind.OFFLINE:
            listed_ids = {r.id for r in listed}
            report.vanished = sorted(
                m.key
                for m in existing.values()
                if m.remote_id not in listed_ids and not m.adapter_uri
            )
    logger.info(
        "model refresh of %s: %d added, %d updated, %d vanished",
        provider.slug,
        len(report.added),
        len(report.updated),
        len(report.vanished),
    )
    return report


def registry_refresh(*, provider: Provider | None = None) -> list[RefreshReport]:
    """Refresh the registry from ``provider`` (or every enabled one). Returns a report per
    provider; a provider that cannot be reached is reported, not raised."""
    providers = [provider] if provider is not None else list(Provider.objects.filter(enabled=True))
    return [_refresh_one(p) for p in providers]


def vanished_keys(models) -> set[str]:
    """Keys among ``models`` (RegisteredModel rows) that their provider's latest refresh did
    not list: their ``last_seen_at`` is behind the newest of their provider's models."""
    providers = {m.provider_id for m in models}
    newest = dict(
        RegisteredModel.objects.filter(provider_id__in=providers)
        .values("provider_id")
        .annotate(newest=Max("last_seen_at"))
        .values_list("provider_id", "newest")
    )
    return {
        m.key
        for m in models
        if m.last_seen_at is not None
        and newest.get(m.provider_id) is not None
        and m.last_seen_at < newest[m.provider_id]
        and not m.adapter_uri
    }


# --- Providers -------------------------------------------------------------------------------

PROVIDER_FIELDS = (
    "name",
    "kind",
    "base_url",
    "enabled",
    "requests_per_minute",
    "tokens_per_minute",
    "timeout_s",
)


def _validate_provider(provider: Provider) -> None:
    if provider.kind == Provider.Kind.OPENAI and not provider.base_url:
        raise InvalidInput(
            "An OpenAI-compatible provider needs a base URL, e.g. https://router.huggingface.co/v1.",
            details={"field": "base_url"},
        )
    if provider.base_url and not provider.base_url.startswith(("http://", "https://")):
        raise InvalidInput(
            "The base URL must start with http:// or https://.", details={"field": "base_url"}
        )
    for name in ("requests_per_minute", "tokens_per_minute"):
        value = getattr(provider, name)
        if value is not None and value < 1:
            raise InvalidInput(f"{name} must be at least 1 (blank: unlimited).")
    if provider.timeout_s is not None and not 0 < provider.timeout_s <= 3600:
        raise InvalidInput("timeout_s must be between 0 and 3600 seconds.")


def provider_create(
    *,
    actor=None,
    slug: str,
    name: str = "",
    kind: str = Provider.Kind.OPENAI,
    base_url: str = "",
    api_key: str = "",
    enabled: bool = True,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
    timeout_s: float | None = None,
) -> Provider:
    from django.utils.text import slugify

    clean = slugify(slug or "")
    if not clean or clean != slug:
        raise InvalidInput(
            "The slug must be lower-case letters, digits and hyphens, e.g. hf-router.",
            details={"field": "slug"},
        )
    if kind not in Provider.Kind.values:
        raise InvalidInput(f"Unknown provider kind {kind!r}.", details={"field": "kind"})
    if Provider.objects.filter(slug=slug).exists():
        raise Conflict(f"A provider named {slug} already exists.", details={"slug": slug})
    provider = Provider(
        slug=slug,
        name=name or slug,
        kind=kind,
        base_url=(base_url or "").strip().rstrip("/"),
        enabled=enabled,
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
        timeout_s=timeout_s,
    )
    _validate_provider(provider)
    provider.set_api_key(api_key)
    provider.save()
    logger.info("provider %s created by %s", slug, getattr(actor, "username", "system"))
    return provider


def provider_update(
    *,
    provider: Provider,
    actor=None,
    api_key: str | None = None,
    clear_api_key: bool = False,
    **fields: Any,
) -> Provider:
    """Change ``fields`` (``PROVIDER_FIELDS``); ``api_key`` None keeps the stored key, a value
    replaces it, ``clear_api_key`` removes it."""
    unknown = set(fields) - set(PROVIDER_FIELDS)
    if unknown:
        raise InvalidInput(f"Unknown provider fields: {', '.join(sorted(unknown))}.")
    for name, value in fields.items():
        if name == "base_url":
            value = (value or "").strip().rstrip("/")
        setattr(provider, name, value)
    if provider.kind not in Provider.Kind.values:
        raise InvalidInput(f"Unknown provider kind {provider.kind!r}.", details={"field": "kind"})
    _validate_provider(provider)
    if clear_api_key:
        provider.set_api_key("")
    elif api_key:
        provider.set_api_key(api_key)
    provider.save()
    logger.info("provider %s updated by %s", provider.slug, getattr(actor, "username", "system"))
    return provider


def provider_delete(*, provider: Provider, actor=None) -> None:
    if provider.kind == Provider.Kind.OFFLINE:
        raise Conflict("The offline provider is built in; disable it instead.")
    slug = provider.slug
    provider.delete()
    logger.info("provider %s deleted by %s", slug, getattr(actor, "username", "system"))


@dataclass
class ConnectionTest:
    ok: bool
    models: int = 0
    sample: list[str] = field(default_factory=list)
    latency_ms: float = 0.0
    error_code: str = ""
    error_message: str = ""

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "models": self.models,
            "sample": self.sample,
            "latency_ms": self.latency_ms,
            "error_code": self.error_code,
            "error_message": self.error_message,
        }


def provider_test(*, provider: Provider, timeout_s: float = 10.0) -> ConnectionTest:
    """List the provider's models once, as "Test connection" does: OK with a count, or the
    typed error's code and message (which never carry the key)."""
    started = time.perf_counter()
    try:
        listed = provider_models_list(provider=provider, timeout_s=timeout_s)
    except Exception as exc:
        return ConnectionTest(
            ok=False,
            latency_ms=round((time.perf_counter() - started) * 1000, 1),
            error_code=getattr(exc, "code", "error"),
            error_message=getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}",
        )
    return ConnectionTest(
        ok=True,
        models=len(listed),
        sample=[m.id for m in listed[:5]],
        latency_ms=round((time.perf_counter() - started) * 1000, 1),
    )


# --- Models ------------------------------------------------------------------------------------

MODEL_FIELDS = (
    "display_name",
    "enabled",
    "allow_unpriced",
    "price_input_per_m",
    "price_output_per_m",
    "capabilities",
    "context_length",
    "requests_per_minute",
    "tokens_per_minute",
)


def model_update(*, model: RegisteredModel, actor=None, **fields: Any) -> RegisteredModel:
    """Change an entry of the registry. Setting a price makes it an admin price (a refresh
    leaves it); clearing both prices returns the model to the table's price on the next
    refresh."""
    unknown = set(fields) - set(MODEL_FIELDS)
    if unknown:
        raise InvalidInput(f"Unknown model fields: {', '.join(sorted(unknown))}.")
    prices = {k: fields.pop(k) for k in ("price_input_per_m", "price_output_per_m") if k in fields}
    for name, value in prices.items():
        if value is not None and Decimal(str(value)) < 0:
            raise InvalidInput(f"{name} must not be negative.", details={"field": name})
    if "capabilities" in fields:
        caps = fields["capabilities"] or []
        if not caps or set(caps) - {"chat", "embeddings"}:
            raise InvalidInput('capabilities must be a non-empty subset of ["chat", "embeddings"].')
        fields["capabilities"] = sorted(set(caps))
    for name in ("requests_per_minute", "tokens_per_minute", "context_length"):
        if fields.get(name) is not None and fields[name] < 1:
            raise InvalidInput(f"{name} must be at least 1 (blank: none).")
    for name, value in fields.items():
        setattr(model, name, value)
    if prices:
        for name, value in prices.items():
            setattr(model, name, None if value is None else Decimal(str(value)))
        if model.price_input_per_m is None and model.price_output_per_m is None:
            model.price_source = ""
        elif model.price_input_per_m is None or model.price_output_per_m is None:
            raise InvalidInput("Give both prices (input and output), or neither.")
        else:
            model.price_source = "admin"
    model.save()
    logger.info("model %s updated by %s", model.key, getattr(actor, "username", "system"))
    return model


# --- Settings ----------------------------------------------------------------------------------

SETTING_LIMITS: dict[str, tuple[float, float]] = {
    "default_runs": (1, 50),
    "retry_attempts": (1, 20),
    "backoff_base_s": (0.01, 60),
    "backoff_cap_s": (0.1, 600),
    "timeout_s": (1, 3600),
    "deadline_s": (1, 86400),
    "cache_ttl_s": (0, 90 * 86400),
    "breaker_failure_threshold": (1, 100),
    "breaker_reset_s": (1, 3600),
}


def gateway_settings_update(*, actor=None, **values: Any) -> GatewaySettings:
    """Validate and save the gateway's settings (all or nothing). Values set in the environment
    win at run time; they can still be saved here and apply once the variable is unset."""
    current = GatewaySettings.load()
    unknown = set(values) - set(GatewaySettings.FIELDS)
    if unknown:
        raise InvalidInput(f"Unknown settings: {', '.join(sorted(unknown))}.")
    errors = {}
    for name, value in values.items():
        low, high = SETTING_LIMITS[name]
        if value is None or not low <= float(value) <= high:
            errors[name] = f"must be between {low:g} and {high:g}"
    merged = {name: values.get(name, getattr(current, name)) for name in GatewaySettings.FIELDS}
    if not errors and merged["backoff_cap_s"] < merged["backoff_base_s"]:
        errors["backoff_cap_s"] = "must not be below the backoff base"
    if not errors and merged["deadline_s"] < merged["timeout_s"]:
        errors["deadline_s"] = "must not be below the per-request timeout"
    if errors:
        raise InvalidInput(
            "Settings not saved: " + "; ".join(f"{k} {v}" for k, v in errors.items()) + ".",
            details={"fields": errors},
        )
    for name, value in values.items():
        field_type = type(getattr(current, name))
        setattr(current, name, field_type(value))
    current.save()
    logger.info("gateway settings updated by %s", getattr(actor, "username", "system"))
    return current


# --- Adapters as models -------------------------------------------------------------------------


def base_model_key(base_model) -> str:
    """The registry key of a training base model: an offline model the gateway's offline
    provider serves (SmolLM2-135M-Instruct today). Any other base is refused by name."""
    from jobs.gateway.providers import OFFLINE_CHAT_MODELS

    for remote_id, name in OFFLINE_CHAT_MODELS.items():
        if name == base_model.name:
            return f"offline/{remote_id}"
    raise Conflict(
        f"The gateway serves adapters offline only on "
        f"{', '.join(sorted(OFFLINE_CHAT_MODELS.values()))}; {base_model.name} is not one.",
        details={"base_model": base_model.name},
    )


def _adapter_checksum(adapter) -> str:
    """sha256 over the adapter's files (names and bytes, checkpoints left out), read through
    the storage module; a stored adapter that cannot be read is named by path and time."""
    import hashlib

    from config.storage import storage_listdir, storage_read

    root = adapter.storage_path.rstrip("/")
    digest = hashlib.sha256()
    try:
        pending, files = [root], []
        while pending:
            folder = pending.pop()
            folders, names = storage_listdir(folder)
            files += [f"{folder}/{n}" for n in names]
            pending += [f"{folder}/{d}" for d in folders if not d.startswith("checkpoint-")]
        if not files:
            raise FileNotFoundError(root)
        for path in sorted(files):
            digest.update(path[len(root) :].encode() + b"\0")
            digest.update(storage_read(path))
        return "sha256:" + digest.hexdigest()
    except (OSError, ValueError) as exc:
        logger.info("adapter %s not readable for a checksum (%s)", root, exc)
        return f"{root}@{adapter.created_at.isoformat()}"[-128:]


def adapter_model_register(*, job) -> RegisteredModel:
    """The job's LoRA adapter as an offline registry entry ``offline/crucible-<job id>``
    (parent: its base model's key; revision: the adapter's checksum, so a retrained adapter
    never hits an old cache entry). Idempotent; the job needs an adapter artifact."""
    from training.models import Artifact

    adapter = Artifact.objects.filter(job_id=job.pk, kind=Artifact.Kind.ADAPTER).first()
    if adapter is None:
        raise Conflict("The job has no adapter artifact.", details={"job": str(job.pk)})
    offline = Provider.objects.filter(slug="offline").first()
    if offline is None:
        raise Conflict("The offline provider is missing; run the migrations.")
    parent = base_model_key(job.base_model)
    remote_id = f"crucible-{job.pk}"
    current = RegisteredModel.objects.filter(provider=offline, remote_id=remote_id).first()
    if (
        current is not None
        and current.adapter_uri == adapter.storage_path
        and current.parent == parent
        and current.updated_at >= adapter.created_at
    ):
        return current  # registered since this adapter was stored: nothing to hash again
    values = {
        "key": f"offline/{remote_id}",
        "display_name": f"{job.name} (adapter)"[:200],
        "capabilities": ["chat"],
        "parent": parent,
        "revision": _adapter_checksum(adapter),
        "adapter_uri": adapter.storage_path,
        "price_input_per_m": Decimal(0),
        "price_output_per_m": Decimal(0),
        "price_source": "local",
    }
    model, created = RegisteredModel.objects.get_or_create(
        provider=offline, remote_id=remote_id, defaults={**values, "enabled": True}
    )
    if not created and any(getattr(model, k) != v for k, v in values.items()):
        for name, value in values.items():
            setattr(model, name, value)
        model.save()
    return model


# --- Status --------------------------------------------------------------------------------------


def gateway_status() -> dict:
    """The gateway's part of /readyz and the dashboard: every provider's circuit breaker
    (shared state: Redis in production, the database cache embedded). Calls nobody."""
    from jobs import gateway

    breakers = gateway.breaker_states()
    return {
        "breakers": breakers,
        "open": sorted(slug for slug, b in breakers.items() if b.get("state") != "closed"),
    }
