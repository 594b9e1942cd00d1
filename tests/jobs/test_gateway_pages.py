"""The model gateway settings page and its JSON API: admins only (the model list is readable by
every role), keys stored encrypted and never shown back, connection tests, toggles, settings
with environment overrides, breaker states on /readyz and the overview."""

from __future__ import annotations

import logging
from decimal import Decimal

import pytest
from django.test import Client

from config.roles import Role
from jobs import services
from jobs.models import GatewaySettings, Provider, RegisteredModel
from tests.conftest import assert_envelope
from tests.jobs.test_gateway_registry import ModelsServer
from tests.training.test_pages import signed_in

URL = "/settings/models/"
HTMX = {"HX-Request": "true"}
RAW_KEY = "sk-very-secret-key-9876"


@pytest.fixture
def server():
    s = ModelsServer()
    s.listing = [ModelsServer.entry("m1"), ModelsServer.entry("m2")]
    yield s
    s.close()


@pytest.fixture
def provider(db, server):
    return services.provider_create(
        slug="loop", name="Loopback", base_url=server.url, api_key=RAW_KEY
    )


@pytest.fixture
def admin(db):
    client, _ = signed_in(Role.ADMIN)
    return client


# --- Authorization ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_page_is_for_admins_only():
    anonymous = Client().get(URL)
    assert anonymous.status_code == 302 and "/login/" in anonymous["Location"]
    for role in (Role.VIEWER, Role.ANALYST, Role.ENGINEER):
        client, _ = signed_in(role)
        assert client.get(URL).status_code == 403
        denied = client.post(URL, {"action": "refresh"})
        assert denied.status_code == 403
    client, _ = signed_in(Role.ADMIN)
    page = client.get(URL)
    assert page.status_code == 200
    html = page.content.decode()
    assert "Model gateway" in html and "offline/smollm2-135m-instruct" in html
    assert 'href="/settings/models/"' in html  # the sidebar link, for admins


@pytest.mark.django_db
def test_the_page_says_which_model_the_judge_calls(admin, settings):
    settings.EVALUATION_JUDGE = "endpoint"
    settings.EVALUATION_JUDGE_MODEL = "nowhere/judge"
    assert "not in the registry" in admin.get(URL).content.decode()
    settings.EVALUATION_JUDGE_MODEL = "offline/smollm2-135m-instruct"
    html = admin.get(URL).content.decode()
    assert (
        '<code>offline/smollm2-135m-instruct</code> <span class="badge badge-success">ready' in html
    )


@pytest.mark.django_db
def test_sidebar_link_only_for_admins():
    client, _ = signed_in(Role.ENGINEER)
    assert 'href="/settings/models/"' not in client.get("/").content.decode()


@pytest.mark.django_db
def test_api_authorization(anon_api, api_as):
    assert_envelope(anon_api.get("gateway/models"), 401)
    viewer = api_as(Role.VIEWER)
    listed = viewer.get("gateway/models")
    assert listed.status_code == 200
    keys = {m["key"] for m in listed.json()}
    assert {"offline/smollm2-135m-instruct", "offline/all-minilm-l6-v2"} <= keys
    chat = viewer.get("gateway/models?capability=chat").json()
    assert "offline/all-minilm-l6-v2" not in {m["key"] for m in chat}
    for role in (Role.VIEWER, Role.ENGINEER, Role.ANALYST):
        client = api_as(role)
        for method, path, body in [
            ("GET", "gateway/providers", None),
            ("POST", "gateway/providers", {"slug": "x", "base_url": "http://127.0.0.1:9/v1"}),
            ("GET", "gateway/providers/offline", None),
            ("PATCH", "gateway/providers/offline", {"enabled": False}),
            ("DELETE", "gateway/providers/offline", None),
            ("POST", "gateway/providers/offline/test", None),
            ("POST", "gateway/refresh", {}),
            ("GET", "gateway/settings", None),
            ("PATCH", "gateway/settings", {"retry_attempts": 2}),
            ("PATCH", "gateway/models/1", {"enabled": False}),
        ]:
            assert_envelope(client.request(method, path, json=body), 403, "permission_denied")
    assert not Provider.objects.filter(slug="x").exists()
    assert Provider.objects.get(slug="offline").enabled
    for method, path in [("GET", "gateway/providers"), ("POST", "gateway/refresh")]:
        assert_envelope(anon_api.request(method, path, json={}), 401)


# --- Keys --------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_keys_are_encrypted_and_never_shown(admin, admin_api, server, caplog):
    caplog.set_level(logging.DEBUG)
    created = admin_api.post(
        "gateway/providers",
        json={"slug": "loop", "name": "Loopback", "base_url": server.url, "api_key": RAW_KEY},
    )
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["api_key_last4"] == "9876" and RAW_KEY not in created.content.decode()
    stored = Provider.objects.get(slug="loop")
    assert RAW_KEY not in stored.api_key_encrypted and stored.api_key() == RAW_KEY

    responses = [
        admin.get(URL),
        admin_api.get("gateway/providers"),
        admin_api.get("gateway/providers/loop"),
        admin_api.post("gateway/providers/loop/test"),
        admin_api.post("gateway/refresh", json={"provider": "loop"}),
        admin.post(URL, {"action": "provider_test", "provider": stored.pk}, headers=HTMX),
    ]
    for response in responses:
        assert response.status_code == 200, response.content
        assert RAW_KEY not in response.content.decode()
    assert "••••9876" in responses[0].content.decode()
    assert server.auth and set(server.auth) == {f"Bearer {RAW_KEY}"}

    # A failing provider: the error names the status, never the key.
    server.status = 401
    failed = admin_api.post("gateway/providers/loop/test").json()
    assert failed["ok"] is False and failed["error_code"] == "provider_error"
    assert RAW_KEY not in str(failed)
    assert RAW_KEY not in caplog.text

    # Replace and clear through the API.
    admin_api.patch("gateway/providers/loop", json={"api_key": "sk-other-0000"})
    stored.refresh_from_db()
    assert stored.api_key_last4 == "0000" and stored.api_key() == "sk-other-0000"
    admin_api.patch("gateway/providers/loop", json={"clear_api_key": True})
    stored.refresh_from_db()
    assert stored.api_key_encrypted == "" and stored.api_key_last4 == ""


@pytest.mark.django_db
def test_the_environment_key_wins_and_is_shown_as_such(admin, provider, monkeypatch):
    monkeypatch.setenv("GATEWAY_LOOP_API_KEY", "sk-from-env-1111")
    html = admin.get(URL).content.decode()
    assert "environment (GATEWAY_LOOP_API_KEY)" in html
    assert "sk-from-env-1111" not in html
    assert provider.api_key() == "sk-from-env-1111"


# --- Page actions ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_add_edit_test_and_delete_a_provider_on_the_page(admin, server):
    added = admin.post(
        URL,
        {
            "action": "provider_save",
            "slug": "loop",
            "kind": "openai",
            "base_url": server.url,
            "api_key": RAW_KEY,
            "enabled": "on",
            "requests_per_minute": "60",
        },
        headers=HTMX,
    )
    assert added.status_code == 200
    html = added.content.decode()
    assert "Provider loop added." in html and 'id="providers"' in html and "<html" not in html
    provider = Provider.objects.get(slug="loop")
    assert provider.requests_per_minute == 60 and provider.api_key() == RAW_KEY

    tested = admin.post(URL, {"action": "provider_test", "provider": provider.pk}, headers=HTMX)
    assert "connected, 2 models listed" in tested.content.decode()
    server.status = 503
    tested = admin.post(URL, {"action": "provider_test", "provider": provider.pk}, headers=HTMX)
    assert "Failed" in tested.content.decode() and "503" in tested.content.decode()

    # Bad input: a clear error, nothing written.
    bad = admin.post(
        URL,
        {"action": "provider_save", "provider": provider.pk, "kind": "openai", "base_url": "nope"},
        headers=HTMX,
    )
    assert bad.status_code == 422 and "Not saved" in bad.content.decode()
    provider.refresh_from_db()
    assert provider.base_url == server.url

    # Blank key keeps the stored one.
    admin.post(
        URL,
        {
            "action": "provider_save",
            "provider": provider.pk,
            "kind": "openai",
            "name": "Renamed",
            "base_url": server.url,
            "api_key": "",
        },
        headers=HTMX,
    )
    provider.refresh_from_db()
    assert provider.name == "Renamed" and provider.api_key() == RAW_KEY
    assert provider.enabled is False  # the checkbox was left unticked

    gone = admin.post(URL, {"action": "provider_delete", "provider": provider.pk}, headers=HTMX)
    assert "Provider loop deleted" in gone.content.decode()
    assert not Provider.objects.filter(slug="loop").exists()
    offline = Provider.objects.get(slug="offline")
    kept = admin.post(URL, {"action": "provider_delete", "provider": offline.pk}, headers=HTMX)
    assert kept.status_code == 422 and "built in" in kept.content.decode()


@pytest.mark.django_db
def test_refresh_button_and_model_toggles(admin, provider, server):
    refreshed = admin.post(URL, {"action": "refresh"}, headers=HTMX)
    html = refreshed.content.decode()
    assert refreshed.status_code == 200 and "loop: 2 added" in html
    assert "loop/m1" in html and "unpriced" in html
    m1 = RegisteredModel.objects.get(key="loop/m1")
    assert m1.enabled is False  # no price: added disabled

    on = admin.post(
        URL,
        {"action": "model_update", "model": m1.pk, "enabled": "on", "allow_unpriced": "on"},
        headers=HTMX,
    )
    assert on.status_code == 200 and "loop/m1 saved." in on.content.decode()
    m1.refresh_from_db()
    assert m1.enabled and m1.allow_unpriced

    priced = admin.post(
        URL,
        {
            "action": "model_update",
            "model": m1.pk,
            "enabled": "on",
            "price_input_per_m": "0.25",
            "price_output_per_m": "1.5",
        },
        headers=HTMX,
    )
    assert priced.status_code == 200
    m1.refresh_from_db()
    assert (m1.price_input_per_m, m1.price_output_per_m) == (Decimal("0.25"), Decimal("1.5"))
    assert m1.price_source == "admin" and not m1.allow_unpriced

    # A model the provider stops listing is marked on the page, and kept.
    server.listing = [ModelsServer.entry("m1")]
    admin.post(URL, {"action": "refresh"}, headers=HTMX)
    page = admin.get(URL).content.decode()
    assert "loop/m2" in page and "no longer listed" in page

    bad = admin.post(
        URL,
        {"action": "model_update", "model": m1.pk, "enabled": "on", "price_input_per_m": "-1"},
        headers=HTMX,
    )
    assert bad.status_code == 422
    m1.refresh_from_db()
    assert m1.price_input_per_m == Decimal("0.25")

    # The API does the same for admins.
    from tests.conftest import ApiClient
    from tests.factories import TokenFactory, UserFactory

    api = ApiClient(TokenFactory(user=UserFactory(role=Role.ADMIN)))
    patched = api.patch(f"gateway/models/{m1.pk}", json={"enabled": False})
    assert patched.status_code == 200 and patched.json()["usable"] is False
    only_one = api.patch(f"gateway/models/{m1.pk}", json={"price_input_per_m": None})
    assert_envelope(only_one, 422)


@pytest.mark.django_db
def test_settings_form_saves_and_the_environment_wins(admin, monkeypatch):
    values = {
        "action": "settings_save",
        "default_runs": "3",
        "retry_attempts": "6",
        "backoff_base_s": "0.25",
        "backoff_cap_s": "10",
        "timeout_s": "30",
        "deadline_s": "120",
        "cache_ttl_s": "3600",
        "breaker_failure_threshold": "4",
        "breaker_reset_s": "20",
    }
    saved = admin.post(URL, values, headers=HTMX)
    assert saved.status_code == 200 and "Gateway settings saved." in saved.content.decode()
    obj = GatewaySettings.load()
    assert (obj.default_runs, obj.retry_attempts, obj.cache_ttl_s) == (3, 6, 3600)

    bad = admin.post(URL, {**values, "backoff_cap_s": "0.1", "retry_attempts": "2"}, headers=HTMX)
    assert bad.status_code == 422 and "backoff" in bad.content.decode()
    assert GatewaySettings.load().retry_attempts == 6  # nothing written

    monkeypatch.setenv("GATEWAY_RETRY_ATTEMPTS", "9")
    page = admin.get(URL).content.decode()
    assert "from environment" in page
    admin.post(URL, {**values, "retry_attempts": "2"}, headers=HTMX)
    obj = GatewaySettings.load()
    assert obj.retry_attempts == 6  # read-only while the environment sets it
    assert obj.effective()["retry_attempts"] == 9


@pytest.mark.django_db
def test_settings_api(admin_api, monkeypatch):
    got = admin_api.get("gateway/settings").json()
    assert got["values"]["retry_attempts"] == 4 and got["from_environment"] == []
    changed = admin_api.patch("gateway/settings", json={"retry_attempts": 7, "cache_ttl_s": 0})
    assert changed.status_code == 200 and changed.json()["stored"]["retry_attempts"] == 7
    assert_envelope(admin_api.patch("gateway/settings", json={"deadline_s": 0.5}), 422)
    monkeypatch.setenv("GATEWAY_CACHE_TTL_S", "5")
    assert admin_api.get("gateway/settings").json()["from_environment"] == ["cache_ttl_s"]


@pytest.mark.django_db
def test_the_page_lists_models_in_few_queries(admin, provider, server):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def queries() -> int:
        """Database queries of the page, leaving out the shared breaker state's cache reads
        (one per provider, in Redis in production; the embedded cache is a table)."""
        with CaptureQueriesContext(connection) as captured:
            assert admin.get(URL).status_code == 200
        return sum("crucible_cache" not in q["sql"] for q in captured.captured_queries)

    server.listing = [ModelsServer.entry(f"m{i}") for i in range(3)]
    services.registry_refresh(provider=provider)
    few = queries()
    server.listing = [ModelsServer.entry(f"m{i}") for i in range(40)]
    services.registry_refresh(provider=provider)
    for n in range(4):
        services.provider_create(slug=f"extra-{n}", base_url=f"http://127.0.0.1:9/v{n}")
    assert queries() == few <= 20  # no query per model or provider


# --- Breakers on /readyz and the overview ----------------------------------------------------


@pytest.mark.django_db
def test_breakers_are_shown_on_readyz_and_the_overview(monkeypatch):
    from jobs import gateway

    states = {"loop": {"state": "open", "retry_after_s": 12.0, "failures": 5}}
    monkeypatch.setattr(gateway, "breaker_states", lambda: states, raising=False)
    admin, _ = signed_in(Role.ADMIN)  # the breakers' details are for admins
    ready = admin.get("/readyz").json()
    assert ready["components"]["model_gateway"]["breakers"] == states
    assert ready["components"]["model_gateway"]["open"] == ["loop"]
    from tests.conftest import ApiClient
    from tests.factories import TokenFactory, UserFactory

    api = ApiClient(TokenFactory(user=UserFactory(role=Role.VIEWER)))
    status = api.get("system/status").json()
    assert status["components"]["model_gateway"]["breakers"]["loop"]["state"] == "open"
    assert "model_gateway" not in ready["degraded"]  # a provider outage leaves us ready
    client, _ = signed_in(Role.VIEWER)
    part = client.get("/?part=status", headers=HTMX).content.decode()
    assert "loop" in part and "open" in part.lower()


# --- Billing page --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_budgets_page_shows_llm_spend_per_model_and_feature(django_assert_max_num_queries):
    from django.utils import timezone

    from billing.models import LedgerEntry, LlmCall
    from billing.services import month_start

    today = timezone.localdate()
    month = month_start()
    common = {"provider": "loop", "day": today, "month": month, "latency_ms": 5, "attempts": 1}
    LlmCall.objects.create(
        feature="judge",
        model="loop/judge-xl",
        prompt_tokens=1000,
        completion_tokens=200,
        cost=Decimal("0.0123"),
        **common,
    )
    LlmCall.objects.create(feature="judge", model="loop/judge-xl", cached=True, cost=0, **common)
    LlmCall.objects.create(
        feature="playground",
        model="offline/smollm2-135m-instruct",
        prompt_tokens=40,
        completion_tokens=20,
        cost=0,
        **common,
    )
    LedgerEntry.objects.create(
        kind=LedgerEntry.Kind.GPU_TIME,
        day=today,
        month=month,
        amount=Decimal("1.50"),
        quantity=3600,
        unit="gpu_second",
        rate=Decimal("0.0004166667"),
    )
    client, _ = signed_in(Role.VIEWER)
    with django_assert_max_num_queries(30):
        page = client.get("/budgets/")
    html = page.content.decode()
    assert page.status_code == 200 and "GPU and LLM spend" in html
    assert "$1.50" in html  # GPU time
    assert "$0.0123" in html and "loop/judge-xl" in html and "offline/smollm2-135m-instruct" in html
    assert ">judge<" in html and ">playground<" in html
    assert "$1.51" in html  # the month's spend counts both
