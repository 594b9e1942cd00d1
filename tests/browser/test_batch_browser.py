"""Batch jobs in headless Chromium: an engineer picks texts, a framework and a model in the
launcher, sees the live estimate, launches; the job page, the results viewer with its charts
and a task's drill-down; screenshots in var/screenshots/batch-*.png."""
# ruff: noqa: F811  (fixtures imported from other modules are redefined as arguments)

from __future__ import annotations

import io

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
from tests.jobs.batch_support import NARRATIVES, json_completion
from tests.jobs.openai_server import OpenAIServer

try:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
except ImportError:  # the driver fixture skips (or fails when required)
    pass

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def setup(db):
    from config.roles import Role
    from config.services import user_create
    from corpora import services as corpus_services
    from jobs.models import Provider, RegisteredModel

    server = OpenAIServer()
    server.completion = json_completion
    provider = Provider.objects.create(
        slug="loop", name="Loopback", kind="openai", base_url=server.url
    )
    model = RegisteredModel.objects.create(
        provider=provider,
        remote_id="test-chat",
        key="loop/test-chat",
        display_name="Loopback chat",
        price_input_per_m=1,
        price_output_per_m=2,
        price_source="admin",
        capabilities=["chat"],
    )
    corpus = corpus_services.corpus_create(
        name="Narratives", upload=io.BytesIO(NARRATIVES.read_bytes()), user=None
    )
    user_create(username="ada", role=Role.ENGINEER, actor=None, password=PASSWORD)
    yield corpus, model
    server.close()


def test_launch_follow_and_read_results(browser, live_server, setup):
    from jobs.batch import services
    from jobs.batch.models import BatchJob

    _sign_in(browser, live_server, "ada", PASSWORD)
    _wait(browser).until(ec.url_to_be(f"{live_server.url}/"))
    browser.get(f"{live_server.url}/batch/")
    assert "No batch jobs yet" in browser.page_source
    _shoot_full_page(browser, "batch-empty.png")
    browser.find_element(By.CSS_SELECTOR, "[data-action=new-job]").click()
    _wait(browser).until(ec.text_to_be_present_in_element((By.TAG_NAME, "h1"), "New batch job"))
    for value in (
        "gettysburg-address",
        "fdr-pearl-harbor",
        "jfk-inaugural",
        "chief-joseph-surrender",
        "eisenhower-d-day",
    ):
        browser.find_element(By.CSS_SELECTOR, f"input[name=documents][value='{value}']").click()
    browser.find_element(
        By.CSS_SELECTOR, "input[name=frameworks][value^='moral_foundations']"
    ).click()
    browser.find_element(By.CSS_SELECTOR, "input[name=models][value='loop/test-chat']").click()
    runs = browser.find_element(By.NAME, "runs")
    runs.clear()
    runs.send_keys("3")
    # 6 chunks (the Gettysburg Address has two) x 1 framework x 1 model x 3 runs.
    _wait(browser).until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "[data-tasks]"), "18"))
    assert "fits" in browser.find_element(By.ID, "estimate").text
    _shoot_full_page(browser, "batch-launcher.png")
    browser.find_element(By.CSS_SELECTOR, "[data-action=launch]").click()
    _wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, "[data-job-status]")))
    job = BatchJob.objects.get()
    assert job.task_count == 18
    services.job_run_inline(job=job)  # what the workers would do
    browser.refresh()
    _wait(browser).until(
        ec.text_to_be_present_in_element((By.CSS_SELECTOR, "[data-finished]"), "18 / 18")
    )
    _shoot_full_page(browser, "batch-job.png")
    browser.find_element(By.CSS_SELECTOR, "[data-action=results]").click()
    _wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, "[data-per-text]")))
    _wait(browser).until(
        lambda b: b.execute_script(
            "return !!(window.Chart && Chart.getChart('chart-distribution') && Chart.getChart('chart-agreement'))"
        )
    )
    assert "Based on 18 of 18 tasks" in browser.page_source
    _shoot_full_page(browser, "batch-results.png")
    browser.find_element(
        By.CSS_SELECTOR, "#drill-title ~ ul a, section[aria-labelledby=drill-title] a"
    ).click()
    _wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, "[data-parsed]")))
    assert "dominant" in browser.find_element(By.CSS_SELECTOR, "[data-parsed]").text
    _shoot_full_page(browser, "batch-task.png")
    assert _console_errors(browser) == []
