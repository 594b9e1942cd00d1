"""The model registry refreshed from providers' ``GET /v1/models`` (the real ``openai`` SDK
against a loopback server): added, updated, no longer listed, prices from the provider's listing
or the genai-prices table, context lengths; the management command and the beat task."""

from __future__ import annotations

import json
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from jobs import services, tasks
from jobs.models import Provider, RegisteredModel


class ModelsServer:
    """A loopback ``/v1/models`` with a settable listing and scripted failures."""

    def __init__(self):
        self.listing: list[dict] = []
        self.status = 200
        self.body: str | None = None
        self.auth: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.auth.append(self.headers.get("Authorization"))
                if self.path.rstrip("/") != "/v1/models":
                    self.send_response(404)
                    self.end_headers()
                    return
                data = (
                    server.body
                    if server.body is not None
                    else json.dumps({"object": "list", "data": server.listing})
                ).encode()
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @staticmethod
    def entry(model_id: str, **extra) -> dict:
        return {"id": model_id, "object": "model", "created": 1, "owned_by": "test", **extra}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ModelsServer()
    yield s
    s.close()


@pytest.fixture
def provider(db, server):
    return services.provider_create(
        slug="local-server", name="Local vLLM", base_url=server.url, api_key="sk-loop-1234"
    )


def test_refresh_adds_models_with_listing_prices_and_context(provider, server):
    server.listing = [
        # vLLM style: max_model_len, no price
        server.entry("meta-llama/Llama-3.1-8B-Instruct", max_model_len=131072),
        # Hugging Face router style: back-ends with $/M prices and context lengths
        server.entry(
            "Qwen/Qwen2.5-7B-Instruct",
            providers=[
                {
                    "provider": "together",
                    "status": "live",
                    "context_length": 32768,
                    "pricing": {"input": 0.3, "output": 0.3},
                },
                {
                    "provider": "novita",
                    "status": "live",
                    "context_length": 65536,
                    "pricing": {"input": 0.1, "output": 0.4},
                },
            ],
        ),
        # OpenRouter style: $ per token as strings
        server.entry("acme/embed-small", pricing={"prompt": "0.00000002", "completion": "0"}),
    ]
    [report] = services.registry_refresh(provider=provider)
    assert report.error == ""
    assert sorted(report.added) == [
        "local-server/Qwen/Qwen2.5-7B-Instruct",
        "local-server/acme/embed-small",
        "local-server/meta-llama/Llama-3.1-8B-Instruct",
    ]
    assert report.unpriced == ["local-server/meta-llama/Llama-3.1-8B-Instruct"]
    assert server.auth == ["Bearer sk-loop-1234"]  # the decrypted key went to the provider

    llama = RegisteredModel.objects.get(key="local-server/meta-llama/Llama-3.1-8B-Instruct")
    assert llama.context_length == 131072
    assert not llama.is_priced and llama.enabled is False  # unpriced: added disabled, flagged
    assert llama.capabilities == ["chat"] and llama.last_seen_at is not None

    qwen = RegisteredModel.objects.get(remote_id="Qwen/Qwen2.5-7B-Instruct")
    # the dearest live back-end (worst case for the budget), the smallest context
    assert (qwen.price_input_per_m, qwen.price_output_per_m) == (Decimal("0.3"), Decimal("0.4"))
    assert qwen.context_length == 32768 and qwen.price_source == "provider:listing"
    assert qwen.enabled is True

    embed = RegisteredModel.objects.get(remote_id="acme/embed-small")
    assert embed.capabilities == ["embeddings"]
    assert embed.price_input_per_m == Decimal("0.02") and embed.price_output_per_m == 0


def test_prices_from_the_genai_prices_table(db):
    """Matched by the provider's URL and the model id; unknown pairs are unpriced."""
    openai_like = Provider(slug="openai", base_url="https://api.openai.com/v1")
    pin, pout, source = services.price_lookup(provider=openai_like, remote_id="gpt-4o-mini")
    assert source == "table:genai-prices"
    assert (pin, pout) == (Decimal("0.15"), Decimal("0.6"))
    assert services.price_lookup(provider=openai_like, remote_id="no-such-model-xyz") is None
    local = Provider(slug="local", base_url="http://127.0.0.1:9/v1")
    assert services.price_lookup(provider=local, remote_id="my-finetune") is None


def test_second_refresh_updates_marks_vanished_and_keeps_admin_prices(provider, server):
    server.listing = [
        server.entry("a-model", pricing={"prompt": "0.000001", "completion": "0.000002"}),
        server.entry("b-model", pricing={"prompt": "0.000001", "completion": "0.000002"}),
    ]
    services.registry_refresh(provider=provider)
    b = RegisteredModel.objects.get(remote_id="b-model")
    services.model_update(model=b, price_input_per_m=Decimal("9"), price_output_per_m=Decimal("9"))

    server.listing = [
        server.entry("b-model", pricing={"prompt": "0.000003", "completion": "0.000004"}),
        server.entry("c-model", context_length=4096),
    ]
    [report] = services.registry_refresh(provider=provider)
    assert report.added == ["local-server/c-model"]
    assert report.vanished == ["local-server/a-model"]
    assert report.updated == []  # b's price is the admin's: the listing does not replace it
    b.refresh_from_db()
    assert (b.price_input_per_m, b.price_source) == (Decimal("9"), "admin")
    a = RegisteredModel.objects.get(remote_id="a-model")  # kept, marked, not deleted
    assert services.vanished_keys(list(provider.models.all())) == {"local-server/a-model"}
    assert a.enabled is True  # the admin's choice stands; the page shows "no longer listed"

    # It comes back: no longer marked.
    server.listing.append(server.entry("a-model"))
    services.registry_refresh(provider=provider)
    assert services.vanished_keys(list(provider.models.all())) == set()


def test_a_failing_provider_is_reported_and_others_still_refresh(db, server):
    bad = services.provider_create(slug="broken", base_url="http://127.0.0.1:9/v1")
    good = services.provider_create(slug="good", base_url=server.url)
    server.listing = [server.entry("m1", pricing={"prompt": "0", "completion": "0"})]
    reports = {r.provider: r for r in services.registry_refresh()}
    assert reports["broken"].error and not reports["broken"].added
    assert reports["good"].added == ["good/m1"]
    assert bad.models.count() == 0 and good.models.count() == 1
    # The offline provider lists its registered models and is never marked vanished.
    assert reports["offline"].error == "" and reports["offline"].vanished == []


@pytest.mark.parametrize(
    "status,body,code",
    [(401, '{"error": {"message": "bad key"}}', "provider_error"), (200, "not json", None)],
)
def test_connection_test_names_the_typed_error(provider, server, status, body, code):
    server.status, server.body = status, body
    result = services.provider_test(provider=provider)
    assert result.ok is False and result.error_message
    if code:
        assert result.error_code == code
    assert "sk-loop-1234" not in result.error_message


def test_connection_test_ok(provider, server):
    server.listing = [server.entry("m1"), server.entry("m2")]
    result = services.provider_test(provider=provider)
    assert result.ok and result.models == 2 and result.sample == ["m1", "m2"]


def test_management_command_and_beat_task(provider, server):
    server.listing = [server.entry("m1", pricing={"prompt": "0", "completion": "0"})]
    out = StringIO()
    call_command("gateway_models_refresh", "--provider", "local-server", stdout=out)
    assert "local-server: 1 added" in out.getvalue() and "+ local-server/m1" in out.getvalue()
    with pytest.raises(CommandError, match="No provider 'nope'"):
        call_command("gateway_models_refresh", "--provider", "nope")

    server.listing.append(server.entry("m2"))
    reports = tasks.refresh_gateway_models(provider.pk)
    assert [r["added"] for r in reports] == [["local-server/m2"]]
    assert tasks.refresh_gateway_models(999999) == []


def test_the_beat_schedule_runs_the_refresh_on_the_control_queue(settings):
    entry = next(
        e
        for e in settings.CELERY_BEAT_SCHEDULE.values()
        if e["task"] == "jobs.tasks.refresh_gateway_models"
    )
    assert entry["schedule"]
    from config.celery import app

    route = app.amqp.router.route({}, "jobs.tasks.refresh_gateway_models")
    assert route["queue"].name == "control"


def test_provider_rules(db):
    from config.errors import Conflict, InvalidInput

    with pytest.raises(InvalidInput, match="base URL"):
        services.provider_create(slug="nourl")
    with pytest.raises(InvalidInput, match="slug"):
        services.provider_create(slug="Bad Slug", base_url="http://x/v1")
    with pytest.raises(InvalidInput, match="http"):
        services.provider_create(slug="ftp", base_url="ftp://x/v1")
    with pytest.raises(Conflict):
        services.provider_create(slug="offline", base_url="http://x/v1")
    with pytest.raises(Conflict):
        services.provider_delete(provider=Provider.objects.get(slug="offline"))
    assert not Provider.objects.filter(slug__in=["nourl", "ftp"]).exists()


def test_settings_rules(db):
    from config.errors import InvalidInput
    from jobs.models import GatewaySettings

    with pytest.raises(InvalidInput, match="backoff_cap_s"):
        services.gateway_settings_update(backoff_base_s=5, backoff_cap_s=1)
    with pytest.raises(InvalidInput, match="retry_attempts"):
        services.gateway_settings_update(retry_attempts=0)
    assert GatewaySettings.load().retry_attempts == 4  # nothing written
    services.gateway_settings_update(retry_attempts=6, cache_ttl_s=60)
    assert GatewaySettings.load().effective()["retry_attempts"] == 6
