"""The Budgets page in headless Chromium, with spending, a chart and the per-job table."""

import pytest
from selenium.webdriver.common.by import By

from tests.browser import test_dashboard_browser as shell
from tests.factories import UserFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

driver = shell.driver
browser = shell.browser


def test_budgets_page_shows_spending_and_chart(browser, live_server):
    import io

    from config.roles import Role
    from corpora.services import training_file_create
    from tests.billing.test_budgets import spend
    from tests.training.conftest import conversations
    from training.models import BaseModel, Preset

    user = UserFactory(username="grace", role=Role.ADMIN, password=shell.PASSWORD)
    assert user.pk
    training_file = training_file_create(
        name="advisor", upload=io.BytesIO(conversations()), user=None
    )
    smollm = BaseModel.objects.get(name="SmolLM2-135M-Instruct")
    smoke = Preset.objects.get(key="smoke")
    spend(training_file, smollm, smoke, dollars=180, name="Acme advisor v3", tags=["client:acme"])
    spend(training_file, smollm, smoke, dollars=95, name="Globex tone", tags=["client:globex"])
    spend(training_file, smollm, smoke, dollars=150, name="Acme advisor v4", tags=["client:acme"])

    shell._sign_in(browser, live_server, "grace", shell.PASSWORD)
    shell._wait(browser).until(lambda b: "/login" not in b.current_url)
    browser.get(f"{live_server.url}/budgets/")
    spent = browser.find_element(By.CSS_SELECTOR, "[data-testid=spent]").text
    assert spent == "$425.00"
    assert "85.0% of the budget used" in browser.find_element(By.CSS_SELECTOR, ".banner").text
    shell._wait(browser).until(
        lambda b: b.execute_script(
            "return !!(window.Chart && Chart.getChart(document.getElementById('spending-chart')))"
        )
    )
    rows = browser.find_elements(By.CSS_SELECTOR, "#jobs-title ~ * tbody tr, table tbody tr")
    assert any("Acme advisor v3" in r.text for r in rows)
    assert "client:acme" in browser.page_source
    shell._shoot(browser, "budgets.png")
    assert not shell._console_errors(browser)
