"""The model gateway settings page in headless Chromium: an admin tests a provider's connection,
refreshes its models and enables one, all through htmx; screenshots in var/screenshots/."""
# ruff: noqa: F811  (fixtures imported from test_dashboard_browser are redefined as arguments)

from __future__ import annotations

import pytest

from tests.browser.test_dashboard_browser import (  # noqa: F401 (fixtures)
    PASSWORD,
    _console_errors,
    _sign_in,
    _wait,
    browser,
    driver,
)
from tests.browser.test_training_browser import _shoot_full_page
from tests.jobs.openai_server import OpenAIServer

try:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
except ImportError:  # the driver fixture skips (or fails when required)
    pass

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def grace(db):
    from config.roles import Role
    from config.services import user_create

    return user_create(
        username="grace",
        role=Role.ADMIN,
        actor=None,
        password=PASSWORD,
        first_name="Grace",
        last_name="Hopper",
    )


@pytest.fixture
def loopback():
    server = OpenAIServer(api_key="sk-browser-5150")
    server.models = [
        {"id": "meta-llama/Llama-3.1-8B-Instruct", "object": "model", "max_model_len": 131072},
        {
            "id": "Qwen/Qwen2.5-7B-Instruct",
            "object": "model",
            "providers": [
                {
                    "provider": "together",
                    "status": "live",
                    "context_length": 32768,
                    "pricing": {"input": 0.3, "output": 0.3},
                }
            ],
        },
        {"id": "acme/embed-small", "object": "model"},
    ]
    yield server
    server.close()


def test_admin_tests_a_provider_refreshes_and_enables_a_model(
    browser, live_server, grace, loopback
):
    from jobs import services
    from jobs.models import RegisteredModel

    services.provider_create(
        slug="hf-router", name="Loopback router", base_url=loopback.url, api_key="sk-browser-5150"
    )
    _sign_in(browser, live_server, "grace", PASSWORD)
    _wait(browser).until(ec.url_to_be(f"{live_server.url}/"))
    browser.find_element(By.LINK_TEXT, "Model gateway").click()
    _wait(browser).until(ec.text_to_be_present_in_element((By.TAG_NAME, "h1"), "Model gateway"))
    active = browser.find_element(By.CSS_SELECTOR, ".nav-link[aria-current=page]")
    assert active.text == "Model gateway"
    assert "••••5150" in browser.find_element(By.ID, "providers").text
    assert "sk-browser-5150" not in browser.page_source

    browser.find_element(By.CSS_SELECTOR, "[data-testid=test-hf-router]").click()
    _wait(browser).until(
        ec.text_to_be_present_in_element((By.ID, "providers"), "connected, 3 models listed")
    )

    browser.find_element(By.ID, "refresh-all").click()
    _wait(browser).until(ec.text_to_be_present_in_element((By.ID, "models"), "3 added"))
    llama = RegisteredModel.objects.get(key="hf-router/meta-llama/Llama-3.1-8B-Instruct")
    assert not llama.enabled and not llama.is_priced

    row = browser.find_element(By.CSS_SELECTOR, f"[data-testid=model-{llama.pk}]")
    row.find_element(By.NAME, "allow_unpriced").click()
    _wait(browser).until(ec.text_to_be_present_in_element((By.ID, "models"), f"{llama.key} saved."))
    llama.refresh_from_db()
    assert llama.allow_unpriced
    assert _console_errors(browser) == []
    _shoot_full_page(browser, "gateway-settings.png")


def test_budgets_page_shows_llm_spend_next_to_gpu(browser, live_server, grace):
    from decimal import Decimal

    from django.utils import timezone

    from billing.models import LlmCall
    from billing.services import month_start

    common = {
        "provider": "hf-router",
        "day": timezone.localdate(),
        "month": month_start(),
        "latency_ms": 420,
        "attempts": 1,
    }
    for n in range(3):
        LlmCall.objects.create(
            feature="judge",
            model="hf-router/meta-llama/Llama-3.1-8B-Instruct",
            prompt_tokens=900,
            completion_tokens=60,
            cost=Decimal("0.000216"),
            cached=n == 2,
            **common,
        )
    LlmCall.objects.create(
        feature="playground",
        model="offline/smollm2-135m-instruct",
        prompt_tokens=40,
        completion_tokens=90,
        **common,
    )
    _sign_in(browser, live_server, "grace", PASSWORD)
    _wait(browser).until(ec.url_to_be(f"{live_server.url}/"))
    browser.get(f"{live_server.url}/budgets/")
    section = _wait(browser).until(ec.visibility_of_element_located((By.ID, "llm-spend")))
    assert "GPU and LLM spend" in section.text and "4 LLM calls" in section.text
    assert "hf-router/meta-llama/Llama-3.1-8B-Instruct" in section.text
    assert "judge" in section.text and "playground" in section.text
    assert _console_errors(browser) == []
    _shoot_full_page(browser, "budgets-llm-spend.png")
