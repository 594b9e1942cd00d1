"""The model gateway's settings page (admins): providers and keys, the model registry, retry,
cache and rate-limit settings, circuit breakers. One view; htmx swaps the card it changed."""

from __future__ import annotations

import logging
import os

from django.contrib import messages
from django.db.models import Case, Count, IntegerField, Q, When
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse

from config.errors import CrucibleError
from config.views import dashboard_view
from jobs import services
from jobs.forms import ModelRowForm, ProviderForm, SettingsForm
from jobs.models import GatewaySettings, Provider, RegisteredModel

# The settings change spend and hold credentials: the admin role's capability.
CAPABILITY = "core.manage_budgets"
MODEL_ROWS = 200
SECTION = "gateway"
logger = logging.getLogger("crucible.jobs")


def breaker_states() -> dict:
    """The gateway's circuit breakers (shared state)."""
    from jobs import gateway

    try:
        return gateway.breaker_states()
    except Exception:  # a cache outage must not take the settings page down
        logger.warning("breaker states unavailable", exc_info=True)
        return {}


def _key_source(provider: Provider) -> str:
    if os.environ.get(provider.env_key_name):
        return f"environment ({provider.env_key_name})"
    if provider.slug == "hf-router" and os.environ.get("HF_TOKEN"):
        return "environment (HF_TOKEN)"
    if provider.api_key_encrypted:
        return "stored"
    return ""


def _plain(value) -> str:
    """A price as a number input shows it: no exponent, no trailing zeros."""
    return "" if value is None else format(value.normalize(), "f")


def _models(query: str):
    models = RegisteredModel.objects.select_related("provider").order_by(
        Case(When(enabled=True, then=0), default=1, output_field=IntegerField()),
        "provider__slug",
        "remote_id",
    )
    if query:
        models = models.filter(Q(key__icontains=query) | Q(display_name__icontains=query))
    return list(models[: MODEL_ROWS + 1])


def _judge() -> dict:
    """Which model the LLM judge calls (settings), and whether the gateway would accept it."""
    from django.conf import settings

    key = settings.EVALUATION_JUDGE_MODEL
    model = RegisteredModel.objects.select_related("provider").filter(key=key).first()
    if model is None:
        problem = "not in the registry"
    elif not (model.enabled and model.provider.enabled):
        problem = "disabled"
    elif not (model.is_priced or model.allow_unpriced):
        problem = "unpriced"
    else:
        problem = ""
    return {"mode": settings.EVALUATION_JUDGE, "model": key, "problem": problem}


def _context(request: HttpRequest, **extra) -> dict:
    obj = GatewaySettings.load()
    overridden = obj.overridden_by_env()
    breakers = breaker_states()
    providers = list(Provider.objects.annotate(model_count=Count("models")).order_by("slug"))
    for provider in providers:
        provider.key_source = _key_source(provider)
        provider.breaker = breakers.get(provider.slug) or {"state": "closed", "failures": 0}
    query = (request.GET.get("q") or request.POST.get("q") or "").strip()[:100]
    models = _models(query)
    vanished = services.vanished_keys(models)
    for model in models:
        model.vanished = model.key in vanished
        model.price_in_text = _plain(model.price_input_per_m)
        model.price_out_text = _plain(model.price_output_per_m)
    context = {
        "section": SECTION,
        "providers": providers,
        "models": models[:MODEL_ROWS],
        "models_truncated": len(models) > MODEL_ROWS,
        "model_counts": {
            "all": RegisteredModel.objects.count(),
            "enabled": RegisteredModel.objects.filter(enabled=True).count(),
            "unpriced": RegisteredModel.objects.filter(
                Q(price_input_per_m__isnull=True) | Q(price_output_per_m__isnull=True)
            ).count(),
        },
        "query": query,
        "gateway_settings": obj,
        "overridden": overridden,
        "settings_form": SettingsForm(initial=obj.effective(), overridden=overridden),
        "provider_form": ProviderForm(initial={"enabled": True}),
        "kinds": Provider.Kind.choices,
        "breakers": breakers,
        "open_breakers": [s for s, b in breakers.items() if b.get("state") != "closed"],
        "judge": _judge(),
    }
    return context | extra


def _render(request: HttpRequest, part: str | None, context: dict, status: int = 200):
    template = "jobs/settings.html" + (f"#{part}" if part else "")
    return render(request, template, context, status=status)


def _done(request: HttpRequest, part: str, text: str, level: str = "success", **extra):
    """After a change: the card it touched (htmx) or the page again (no JavaScript)."""
    if request.htmx:
        context = _context(request, notice={"level": level, "text": text, "part": part}, **extra)
        return _render(request, part, context)
    getattr(messages, level if level != "danger" else "error")(request, text)
    return redirect(reverse("jobs:settings") + f"#{part}")


def _failed(request: HttpRequest, part: str, text: str, **extra):
    if request.htmx:
        context = _context(request, notice={"level": "error", "text": text, "part": part}, **extra)
        return _render(request, part, context, status=422)
    messages.error(request, text)
    return redirect(reverse("jobs:settings") + f"#{part}")


def _form_errors(form) -> str:
    return "; ".join(
        f"{form.fields[name].label or name.replace('_', ' ') if name in form.fields else name}: "
        f"{' '.join(errs)}"
        for name, errs in form.errors.items()
    )


@dashboard_view
def settings_page(request: HttpRequest) -> HttpResponse:
    if not request.user.has_perm(CAPABILITY):
        return render(
            request, "403.html", {"message": "Only admins manage the model gateway."}, status=403
        )
    if request.method == "GET":
        part = request.GET.get("part") if request.htmx else None
        if part not in (None, "providers", "models", "settings", "breakers"):
            part = None
        return _render(request, part, _context(request))
    if request.method != "POST":
        return HttpResponse(status=405, headers={"Allow": "GET, POST"})
    action = request.POST.get("action", "")
    handler = ACTIONS.get(action)
    if handler is None:
        return _failed(request, "providers", f"Unknown action {action!r}.")
    try:
        return handler(request)
    except CrucibleError as exc:
        return _failed(request, PARTS[action], exc.message)


def _provider_save(request: HttpRequest) -> HttpResponse:
    provider_id = request.POST.get("provider")
    provider = get_object_or_404(Provider, pk=provider_id) if provider_id else None
    form = ProviderForm(request.POST)
    if not form.is_valid():
        return _failed(request, "providers", "Not saved: " + _form_errors(form))
    data = form.cleaned_data
    fields = {
        "name": data["name"],
        "kind": data["kind"],
        "base_url": data["base_url"] or "",
        "enabled": data["enabled"],
        "requests_per_minute": data["requests_per_minute"],
        "tokens_per_minute": data["tokens_per_minute"],
        "timeout_s": data["timeout_s"],
    }
    if provider is None:
        provider = services.provider_create(
            actor=request.user, slug=data["slug"] or "", api_key=data["api_key"], **fields
        )
        return _done(request, "providers", f"Provider {provider.slug} added.")
    fields["name"] = fields["name"] or provider.name
    services.provider_update(
        provider=provider,
        actor=request.user,
        api_key=data["api_key"] or None,
        clear_api_key=data["clear_api_key"],
        **fields,
    )
    return _done(request, "providers", f"Provider {provider.slug} saved.")


def _provider_delete(request: HttpRequest) -> HttpResponse:
    provider = get_object_or_404(Provider, pk=request.POST.get("provider"))
    slug = provider.slug
    services.provider_delete(provider=provider, actor=request.user)
    return _done(request, "providers", f"Provider {slug} deleted with its models.")


def _provider_test(request: HttpRequest) -> HttpResponse:
    provider = get_object_or_404(Provider, pk=request.POST.get("provider"))
    result = services.provider_test(provider=provider)
    tested = {"provider_id": provider.pk, **result.as_dict()}
    if result.ok:
        text = (
            f"{provider.slug}: connected, {result.models} models listed "
            f"in {result.latency_ms:g} ms."
        )
        return _done(request, "providers", text, tested=tested)
    text = f"{provider.slug}: {result.error_code}: {result.error_message}"
    return _done(request, "providers", text, level="error", tested=tested)


def _refresh(request: HttpRequest) -> HttpResponse:
    provider_id = request.POST.get("provider")
    provider = get_object_or_404(Provider, pk=provider_id) if provider_id else None
    reports = services.registry_refresh(provider=provider)
    lines = []
    failed = False
    for r in reports:
        if r.error:
            failed = True
            lines.append(f"{r.provider}: failed ({r.error})")
        else:
            lines.append(
                f"{r.provider}: {len(r.added)} added, {len(r.updated)} updated, "
                f"{len(r.vanished)} no longer listed"
            )
    text = "Models refreshed. " + "; ".join(lines) if lines else "No enabled provider to refresh."
    return _done(request, "models", text, level="warning" if failed else "success")


def _model_update(request: HttpRequest) -> HttpResponse:
    model = get_object_or_404(RegisteredModel, pk=request.POST.get("model"))
    form = ModelRowForm(request.POST)
    if not form.is_valid():
        return _failed(request, "models", f"{model.key} not saved: " + _form_errors(form))
    data = form.cleaned_data
    fields = {
        "enabled": data["enabled"],
        "allow_unpriced": data["allow_unpriced"],
        "requests_per_minute": data["requests_per_minute"],
        "tokens_per_minute": data["tokens_per_minute"],
    }
    new_prices = (data["price_input_per_m"], data["price_output_per_m"])
    if new_prices != (model.price_input_per_m, model.price_output_per_m):
        fields["price_input_per_m"], fields["price_output_per_m"] = new_prices
    services.model_update(model=model, actor=request.user, **fields)
    return _done(request, "models", f"{model.key} saved.")


def _settings_save(request: HttpRequest) -> HttpResponse:
    obj = GatewaySettings.load()
    overridden = obj.overridden_by_env()
    form = SettingsForm(request.POST, initial=obj.effective(), overridden=overridden)
    if not form.is_valid():
        return _failed(request, "settings", "Settings not saved: " + _form_errors(form))
    values = {k: v for k, v in form.cleaned_data.items() if k not in overridden}
    services.gateway_settings_update(actor=request.user, **values)
    return _done(request, "settings", "Gateway settings saved.")


ACTIONS = {
    "provider_save": _provider_save,
    "provider_delete": _provider_delete,
    "provider_test": _provider_test,
    "refresh": _refresh,
    "model_update": _model_update,
    "settings_save": _settings_save,
}
PARTS = {
    "provider_save": "providers",
    "provider_delete": "providers",
    "provider_test": "providers",
    "refresh": "models",
    "model_update": "models",
    "settings_save": "settings",
}
