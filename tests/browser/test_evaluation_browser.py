"""The validation pages in headless Chromium: the runs list, the before/after dashboard, the
blind rating page (rating two items through htmx), an approval and a share link.

Skipped like the other browser tests when Chromium is missing (unless
CRUCIBLE_REQUIRE_BROWSER=1). Screenshots land in var/screenshots/evaluation-*.png.
"""

from __future__ import annotations

import pytest

from config.templatetags.crucible import arrows
from tests.browser.test_dashboard_browser import (  # noqa: F401 (fixtures)
    PASSWORD,
    _console_errors,
    _shoot,
    _sign_in,
    _stylesheet_applied,
    _wait,
    browser,
    driver,
)
from tests.evaluation.core_fixtures import (  # noqa: F401 (fixtures)
    REVEALING,
    completed_job,
    completed_run,
    fake_pdf,
    fake_scoring,
    fast_settings,
)

try:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
except ImportError:  # the driver fixture skips (or fails when browsers are required)
    By = ec = None

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def grace(db):
    from config.roles import Role
    from config.services import user_create

    return user_create(
        username="grace",
        role=Role.ANALYST,
        actor=None,
        password=PASSWORD,
        first_name="Grace",
        last_name="Hopper",
    )


def _full_page(chromium, name: str) -> None:
    height = chromium.execute_script("return document.documentElement.scrollHeight")
    chromium.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {
            "width": 1440,
            "height": min(max(900, height), 6000),
            "deviceScaleFactor": 1,
            "mobile": False,
        },
    )
    try:
        _shoot(chromium, name)
    finally:
        chromium.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_dashboard_rating_approval_and_sharing(browser, live_server, grace, completed_run):  # noqa: F811
    _sign_in(browser, live_server, "grace", PASSWORD)
    _wait(browser).until(ec.url_to_be(f"{live_server.url}/"))

    browser.get(f"{live_server.url}/evaluations/")
    assert _stylesheet_applied(browser)
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-run="{completed_run.pk}"]')
    assert "Completed" in row.text and "%" in row.text
    _shoot(browser, "evaluation-index.png")

    row.find_element(By.CSS_SELECTOR, "a.job-name").click()
    _wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".metric-cards")))
    cards = browser.find_elements(By.CSS_SELECTOR, ".metric-card")
    assert [c.get_attribute("data-metric") for c in cards] == [
        "perplexity",
        "retention",
        "emotional_intelligence",
        "brand_voice",
    ]
    perplexity = cards[0].text
    assert "Pass" in perplexity and "95% CI" in perplexity
    # The page writes the stored figure with the UI's one arrow (the `arrows` filter).
    assert arrows(completed_run.metrics["perplexity"]["display"]) in perplexity
    assert len(browser.find_elements(By.CSS_SELECTOR, ".example")) == 10
    assert _console_errors(browser) == []
    _full_page(browser, "evaluation-dashboard.png")

    # Approve with a reason: the panel is swapped in place.
    panel = browser.find_element(By.ID, "approval")
    panel.find_element(By.NAME, "reason").send_keys("Meets the perplexity and EI targets.")
    panel.find_element(By.CSS_SELECTOR, '[data-action="approve"]').click()
    _wait(browser).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, '[data-current-decision="approved"]'))
    )
    assert "Meets the perplexity" in browser.find_element(By.ID, "approval").text

    # A share link appears with its URL; it opens without signing in.
    browser.find_element(By.CSS_SELECTOR, '#reports [data-action="share"]').click()
    _wait(browser).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, '#reports [data-share="active"]'))
    )
    share_url = browser.find_element(By.CSS_SELECTOR, ".share-url").get_attribute("value")
    assert "/evaluations/shared/" in share_url
    _shoot(browser, "evaluation-dashboard-approved.png")

    # Blind rating: two items through htmx, no side names anywhere in the page.
    browser.get(f"{live_server.url}/evaluations/runs/{completed_run.pk}/rate/")
    for n in range(2):
        _wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".rating-form")))
        source = browser.page_source.lower()
        assert not any(word in source for word in REVEALING)
        assert f"Rated {n} of 80" in browser.find_element(By.CSS_SELECTOR, ".rate-progress").text
        if n == 1:
            _full_page(browser, "evaluation-rate.png")
        for label in browser.find_elements(By.CSS_SELECTOR, ".scale label:nth-child(4)"):
            label.click()
        browser.find_element(By.CSS_SELECTOR, '[data-action="submit-rating"]').click()
        _wait(browser).until(
            ec.text_to_be_present_in_element((By.CSS_SELECTOR, ".rate-progress"), f"Rated {n + 1}")
        )
    from evaluation.models import HumanRating

    assert HumanRating.objects.filter(rater=grace).count() == 2
    assert set(HumanRating.objects.first().left_scores.values()) == {4}
    assert _console_errors(browser) == []

    browser.delete_all_cookies()
    browser.get(share_url)
    assert "Download the PDF report" in browser.page_source
    _shoot(browser, "evaluation-shared.png")
