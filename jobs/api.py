"""Model gateway API: the registry (readable by every role), providers, refresh and settings
(admins). API keys go in, never out: responses carry only their last four characters."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.http import HttpRequest
from ninja import Field, Query, Router, Schema
from ninja.responses import Status

from config.api_routes import ERRORS
from config.auth import requires
from config.errors import NotFound
from jobs import services
from jobs.models import GatewaySettings, Provider, RegisteredModel
from jobs.views import CAPABILITY, breaker_states

router = Router(tags=["gateway"])
ADMIN = requires(CAPABILITY.split(".", 1)[1])


# --- Schemas -----------------------------------------------------------------------------------


class ModelOut(Schema):
    id: int
    key: str
    provider: str
    remote_id: str
    display_name: str
    capabilities: list[str]
    context_length: int | None
    price_input_per_m: Decimal | None
    price_output_per_m: Decimal | None
    price_source: str
    priced: bool
    enabled: bool
    allow_unpriced: bool
    usable: bool = Field(..., description="Enabled, provider enabled, and priced or allowed")
    parent: str
    revision: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    last_seen_at: datetime | None

    @staticmethod
    def resolve_provider(obj) -> str:
        return obj.provider.slug

    @staticmethod
    def resolve_priced(obj) -> bool:
        return obj.is_priced

    @staticmethod
    def resolve_usable(obj) -> bool:
        return obj.enabled and obj.provider.enabled and (obj.is_priced or obj.allow_unpriced)


class ModelsQuery(Schema):
    capability: str | None = Field(None, pattern="^(chat|embeddings)$")
    all: bool = Field(False, description="Disabled models too")


class ModelPatch(Schema):
    display_name: str | None = Field(None, max_length=200)
    enabled: bool | None = None
    allow_unpriced: bool | None = None
    price_input_per_m: Decimal | None = Field(None, ge=0, max_digits=12, decimal_places=6)
    price_output_per_m: Decimal | None = Field(None, ge=0, max_digits=12, decimal_places=6)
    capabilities: list[str] | None = None
    context_length: int | None = Field(None, ge=1)
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)


class ProviderOut(Schema):
    id: int
    slug: str
    name: str
    kind: str
    base_url: str
    enabled: bool
    api_key_last4: str = Field(..., description="Last four characters of the stored key")
    api_key_from_env: bool
    requests_per_minute: int | None
    tokens_per_minute: int | None
    timeout_s: float | None
    models: int
    breaker: dict
    created_at: datetime
    updated_at: datetime

    @staticmethod
    def resolve_api_key_from_env(obj) -> bool:
        import os

        return bool(os.environ.get(obj.env_key_name)) or (
            obj.slug == "hf-router" and bool(os.environ.get("HF_TOKEN"))
        )

    @staticmethod
    def resolve_models(obj) -> int:
        return getattr(obj, "model_count", None) or obj.models.count()

    @staticmethod
    def resolve_breaker(obj) -> dict:
        return getattr(obj, "breaker", None) or {"state": "closed", "failures": 0}


class ProviderIn(Schema):
    slug: str = Field(..., pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    name: str = Field("", max_length=120)
    kind: str = Field("openai", pattern="^(openai|offline)$")
    base_url: str = Field("", max_length=300)
    api_key: str = Field("", max_length=500, description="Stored encrypted; never returned")
    enabled: bool = True
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    timeout_s: float | None = Field(None, gt=0, le=3600)


class ProviderPatch(Schema):
    name: str | None = Field(None, max_length=120)
    base_url: str | None = Field(None, max_length=300)
    api_key: str | None = Field(None, max_length=500, description="A new key; omit to keep")
    clear_api_key: bool = False
    enabled: bool | None = None
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    timeout_s: float | None = Field(None, gt=0, le=3600)


class TestOut(Schema):
    ok: bool
    models: int
    sample: list[str]
    latency_ms: float
    error_code: str
    error_message: str


class RefreshIn(Schema):
    provider: str | None = Field(None, description="A provider's slug; all enabled when omitted")


class RefreshOut(Schema):
    provider: str
    added: list[str]
    updated: list[str]
    vanished: list[str]
    unpriced: list[str]
    error: str


class SettingsOut(Schema):
    values: dict = Field(..., description="Effective values (the environment wins)")
    stored: dict
    from_environment: list[str]


class SettingsPatch(Schema):
    default_runs: int | None = None
    retry_attempts: int | None = None
    backoff_base_s: float | None = None
    backoff_cap_s: float | None = None
    timeout_s: float | None = None
    deadline_s: float | None = None
    cache_ttl_s: int | None = None
    breaker_failure_threshold: int | None = None
    breaker_reset_s: float | None = None


# --- Helpers -----------------------------------------------------------------------------------


def _provider(slug: str) -> Provider:
    provider = Provider.objects.filter(slug=slug).first()
    if provider is None:
        raise NotFound(f"No provider {slug!r}.", details={"slug": slug})
    provider.breaker = breaker_states().get(slug)
    return provider


def _settings_out() -> dict:
    obj = GatewaySettings.load()
    return {
        "values": obj.effective(),
        "stored": {name: getattr(obj, name) for name in GatewaySettings.FIELDS},
        "from_environment": obj.overridden_by_env(),
    }


# --- Routes ------------------------------------------------------------------------------------


@router.get(
    "/gateway/models",
    response={200: list[ModelOut], **ERRORS},
    summary="Models the gateway can call",
    auth=requires("view_dashboard"),
)
def models_list(request: HttpRequest, query: Query[ModelsQuery]):
    models = RegisteredModel.objects.select_related("provider").order_by("key")
    if not query.all:
        models = models.enabled()
    if query.capability:
        models = models.with_capability(query.capability)
    return list(models)


@router.patch(
    "/gateway/models/{model_id}",
    response={200: ModelOut, **ERRORS},
    summary="Enable, price or limit a model",
    auth=ADMIN,
)
def models_update(request: HttpRequest, model_id: int, payload: ModelPatch):
    model = RegisteredModel.objects.select_related("provider").filter(pk=model_id).first()
    if model is None:
        raise NotFound(f"No model with id {model_id}.", details={"id": model_id})
    fields = payload.dict(exclude_unset=True)
    return services.model_update(model=model, actor=request.auth, **fields)


@router.get(
    "/gateway/providers",
    response={200: list[ProviderOut], **ERRORS},
    summary="Providers (keys never shown)",
    auth=ADMIN,
)
def providers_list(request: HttpRequest):
    from django.db.models import Count

    breakers = breaker_states()
    providers = list(Provider.objects.annotate(model_count=Count("models")).order_by("slug"))
    for provider in providers:
        provider.breaker = breakers.get(provider.slug)
    return providers


@router.post(
    "/gateway/providers",
    response={201: ProviderOut, **ERRORS},
    summary="Add a provider",
    auth=ADMIN,
)
def providers_create(request: HttpRequest, payload: ProviderIn):
    provider = services.provider_create(actor=request.auth, **payload.dict())
    return Status(201, provider)


@router.get(
    "/gateway/providers/{slug}",
    response={200: ProviderOut, **ERRORS},
    summary="One provider",
    auth=ADMIN,
)
def providers_get(request: HttpRequest, slug: str):
    return _provider(slug)


@router.patch(
    "/gateway/providers/{slug}",
    response={200: ProviderOut, **ERRORS},
    summary="Change a provider (a new key replaces the stored one)",
    auth=ADMIN,
)
def providers_update(request: HttpRequest, slug: str, payload: ProviderPatch):
    provider = _provider(slug)
    fields = payload.dict(exclude_unset=True)
    api_key = fields.pop("api_key", None)
    clear = fields.pop("clear_api_key", False)
    return services.provider_update(
        provider=provider, actor=request.auth, api_key=api_key, clear_api_key=clear, **fields
    )


@router.delete(
    "/gateway/providers/{slug}",
    response={204: None, **ERRORS},
    summary="Delete a provider and its models",
    auth=ADMIN,
)
def providers_delete(request: HttpRequest, slug: str):
    services.provider_delete(provider=_provider(slug), actor=request.auth)
    return Status(204, None)


@router.post(
    "/gateway/providers/{slug}/test",
    response={200: TestOut, **ERRORS},
    summary="List the provider's models once (connection test)",
    auth=ADMIN,
)
def providers_test(request: HttpRequest, slug: str):
    return services.provider_test(provider=_provider(slug)).as_dict()


@router.post(
    "/gateway/refresh",
    response={200: list[RefreshOut], **ERRORS},
    summary="Refresh the registry from the providers' /v1/models",
    auth=ADMIN,
)
def registry_refresh(request: HttpRequest, payload: RefreshIn | None = None):
    provider = _provider(payload.provider) if payload and payload.provider else None
    return [r.as_dict() for r in services.registry_refresh(provider=provider)]


@router.get(
    "/gateway/settings",
    response={200: SettingsOut, **ERRORS},
    summary="Retry, cache and breaker settings",
    auth=ADMIN,
)
def settings_get(request: HttpRequest):
    return _settings_out()


@router.patch(
    "/gateway/settings",
    response={200: SettingsOut, **ERRORS},
    summary="Change retry, cache and breaker settings",
    auth=ADMIN,
)
def settings_update(request: HttpRequest, payload: SettingsPatch):
    values = {k: v for k, v in payload.dict(exclude_unset=True).items() if v is not None}
    services.gateway_settings_update(actor=request.auth, **values)
    return _settings_out()
