"""The training pages in headless Chromium: the job list, a finished job with its loss
chart, and a failed job with its fix; a retry from the page goes through the API.

Skipped like the other browser tests when Chromium is missing (unless
CRUCIBLE_REQUIRE_BROWSER=1). Screenshots land in var/screenshots/training-*.png.
"""

from __future__ import annotations

import io

import pytest

from tests.browser.test_dashboard_browser import (  # noqa: F401 (fixtures)
    PASSWORD,
    _console_errors,
    _shoot,
    _sign_in,
    _stylesheet_applied,
    _wait,
    ada,
    browser,
    driver,
)
from tests.training.test_pages import seed_jobs

try:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select
except ImportError:  # the driver fixture skips (or fails when browsers are required)
    By = ec = Select = None

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def jobs(ada):  # noqa: F811
    from corpora.services import training_file_create
    from tests.training.conftest import conversations
    from training.models import BaseModel, Preset

    training_file = training_file_create(
        name="advisor-v2", upload=io.BytesIO(conversations(12)), user=ada
    )
    return seed_jobs(
        training_file,
        BaseModel.objects.get(name="SmolLM2-135M-Instruct"),
        Preset.objects.get(key="smoke"),
        user=ada,
    )


def _shoot_full_page(chromium, name: str) -> None:
    """A screenshot of the whole page: the viewport is stretched to the page's height."""
    height = chromium.execute_script("return document.documentElement.scrollHeight")
    metrics = {"width": 1440, "height": min(max(900, height), 6000)}
    chromium.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {**metrics, "deviceScaleFactor": 1, "mobile": False}
    )
    try:
        chromium.execute_script("return new Promise(r => requestAnimationFrame(() => r()))")
        _shoot(chromium, name)
    finally:
        chromium.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def _table_names(chromium) -> list[str]:
    return [a.text for a in chromium.find_elements(By.CSS_SELECTOR, "#training-jobs .job-name")]


def test_training_list_and_job_pages(browser, live_server, ada, jobs, monkeypatch):  # noqa: F811
    # A retry started from the page must not launch a real worker here.
    monkeypatch.setattr("training.services._enqueue_launch", lambda job: None)
    _sign_in(browser, live_server, "ada", PASSWORD)
    _wait(browser).until(ec.url_to_be(f"{live_server.url}/"))

    # --- The list -------------------------------------------------------------------
    browser.get(f"{live_server.url}/training/")
    _wait(browser).until(ec.presence_of_element_located((By.ID, "training-jobs")))
    assert _stylesheet_applied(browser)
    assert browser.execute_script(
        "return getComputedStyle(document.querySelector('.badge-training')).color"
    ) != browser.execute_script(
        "return getComputedStyle(document.querySelector('.badge-cancelled')).color"
    ), "training.css did not load"
    assert len(_table_names(browser)) == len(jobs)
    table = browser.find_element(By.ID, "training-jobs")
    assert table.get_attribute("hx-trigger") == "every 5s"  # a job is running
    assert "Interrupted 1x, resumed successfully" in table.text
    assert "\u221231%" in table.text
    active = browser.find_element(By.CSS_SELECTOR, ".nav-link[aria-current=page]")
    assert active.text == "Training"
    assert _console_errors(browser) == []
    _shoot_full_page(browser, "training-list.png")

    # Compare: pick two jobs; the selection survives the live refresh of the table.
    button = browser.find_element(By.ID, "compare-button")
    assert not button.is_enabled()
    picked = [jobs["completed"], jobs["failed"]]
    for job in picked:
        box = browser.find_element(By.CSS_SELECTOR, f".compare-check[value='{job.pk}']")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
        box.click()
    assert browser.find_element(By.ID, "compare-button").is_enabled()
    browser.execute_script("document.getElementById('training-jobs').dataset.stale = '1'")
    _wait(browser).until(
        lambda b: not b.find_element(By.ID, "training-jobs").get_attribute("data-stale")
    )
    checked = browser.execute_script(
        "return [...document.querySelectorAll('.compare-check:checked')].map(b => b.value)"
    )
    assert sorted(checked) == sorted(str(j.pk) for j in picked)
    assert "2 selected" in browser.find_element(By.ID, "compare-form").text
    compare_url = browser.execute_script(
        "const f = document.getElementById('compare-form');"
        "return f.action + '?' + new URLSearchParams(new FormData(f)).toString();"
    )
    assert compare_url.count("jobs=") == 2 and "/training/compare/" in compare_url
    for job in picked:  # clear the selection again
        box = browser.find_element(By.CSS_SELECTOR, f".compare-check[value='{job.pk}']")
        browser.execute_script("arguments[0].click()", box)

    # More filters open in place.
    toggle = browser.find_element(By.CSS_SELECTOR, "[data-toggle-filters]")
    toggle.click()
    assert browser.find_element(By.ID, "filters-more").is_displayed()
    assert toggle.get_attribute("aria-expanded") == "true"
    _shoot(browser, "training-list-filters.png")
    toggle.click()

    # Filtering swaps the table in place and puts the filter in the address bar.
    browser.execute_script("document.getElementById('training-jobs').dataset.stale = '1'")
    Select(browser.find_element(By.NAME, "status")).select_by_value("failed")
    _wait(browser).until(ec.url_to_be(f"{live_server.url}/training/?status=failed"))
    _wait(browser).until(
        lambda b: (
            not b.find_element(By.ID, "training-jobs").get_attribute("data-stale")
            and _table_names(b) == [jobs["failed"].name]
        )
    )
    assert len(browser.find_elements(By.TAG_NAME, "h1")) == 1, "the partial came back whole"
    search = browser.find_element(By.NAME, "q")
    search.send_keys("no-such-job")
    _wait(browser).until(
        ec.text_to_be_present_in_element((By.ID, "training-jobs"), "No jobs match these filters")
    )

    # --- A completed job: results and the loss chart -----------------------------------
    completed = jobs["completed"]
    browser.get(f"{live_server.url}/training/{completed.pk}/")
    _wait(browser).until(
        lambda b: (
            b.execute_script(
                "return window.Chart && Chart.getChart('loss-chart') ? "
                "Chart.getChart('loss-chart').data.datasets.map(d => d.data.length) : null"
            )
            == [60, 6, 60]
        )
    )
    canvas = browser.find_element(By.ID, "loss-chart")
    assert canvas.size["width"] > 400 and canvas.size["height"] > 200
    assert not browser.find_element(By.ID, "loss-chart-empty").is_displayed()
    results = browser.find_element(By.ID, "job-results")
    assert "Perplexity: 24.5 → 16.8 (31% improvement)" in results.text
    assert "Resume check passed" in results.text
    # The downloads menu opens.
    browser.find_element(By.CSS_SELECTOR, ".menu > summary").click()
    menu = _wait(browser).until(ec.visibility_of_element_located((By.CSS_SELECTOR, ".menu-list")))
    assert "Deployment package" in menu.text
    browser.find_element(By.CSS_SELECTOR, ".menu > summary").click()
    assert _console_errors(browser) == []
    _shoot_full_page(browser, "training-detail.png")

    # --- A failed OOM job: the fix, and a one-click retry ------------------------------
    failed = jobs["failed"]
    browser.get(f"{live_server.url}/training/{failed.pk}/")
    panel = _wait(browser).until(ec.visibility_of_element_located((By.ID, "job-error")))
    assert "Out of GPU memory" in panel.text
    assert "Retry with micro_batch_size=2 and gradient_accumulation_steps=4" in panel.text
    button = panel.find_element(By.CSS_SELECTOR, "[data-job-action=retry]")
    assert button.text == "Retry with micro_batch_size=2, gradient_accumulation_steps=4"
    assert _console_errors(browser) == []
    _shoot_full_page(browser, "training-failed.png")

    button = browser.find_element(By.CSS_SELECTOR, "#job-error [data-job-action=retry]")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
    button.click()
    _wait(browser).until(
        lambda b: b.current_url.rstrip("/") != f"{live_server.url}/training/{failed.pk}"
    )
    _wait(browser).until(ec.text_to_be_present_in_element((By.TAG_NAME, "h1"), "(retry 1)"))
    assert "Retry of" in browser.find_element(By.CSS_SELECTOR, ".job-head").text
    assert _console_errors(browser) == []

    # The session ends while the (queued) retry's page follows it: the page says so and
    # keeps its content instead of swapping the sign-in page into it.
    browser.delete_cookie("sessionid")
    box = _wait(browser).until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, "#job-status .live-error"))
    )
    assert "Sign in again" in box.text
    assert browser.find_element(By.ID, "job-status").is_displayed()
    assert not browser.find_elements(By.CSS_SELECTOR, "#job-status form[action*=login]")
    _shoot(browser, "training-session-ended.png")


# --- The main path: a real Smoke job from the form, followed live, downloaded ---------------


def _estimate_text(chromium) -> str:
    return chromium.execute_script(
        "const el = document.querySelector('#estimate [data-estimate=duration]');"
        "return el ? el.textContent : '';"
    )


@pytest.mark.slow
def test_main_path_smoke_job_from_the_form(browser, live_server, ada, settings):  # noqa: F811
    """Sign in, create a Smoke job from the form while the estimate updates, watch it train
    to completed on its page without a reload, then download the adapters.

    The one real training of the dashboard tests: the local executor runs gpu.train on the
    offline SmolLM2 model; the worker's webhooks reach the live server.
    """
    import time
    from pathlib import Path

    from corpora.services import training_file_create
    from training import services
    from training.models import JobStatus, TrainingJob

    root = Path(__file__).resolve().parents[2]
    settings.CRUCIBLE_PUBLIC_URL = live_server.url
    settings.TRAINING_LAUNCH_INLINE = True
    settings.RATELIMIT_ENABLE = False
    settings.TRAINING_MODEL_CACHE = str(root / "var" / "models")
    sample = root / "samples" / "training" / "financial_advisor_v1.jsonl"
    with sample.open("rb") as handle:
        training_file = training_file_create(name="advisor-sample", upload=handle, user=ada)
    # The page path is the claim here, not the training: Smoke is cut to four short steps
    # (the full Smoke run is tests/training/test_end_to_end.py's).
    from tests.training.conftest import shrink_smoke_preset

    shrink_smoke_preset()

    _sign_in(browser, live_server, "ada", PASSWORD)
    _wait(browser).until(ec.url_to_be(f"{live_server.url}/"))
    browser.get(f"{live_server.url}/training/")
    empty = _wait(browser).until(ec.visibility_of_element_located((By.CSS_SELECTOR, ".empty")))
    assert "No training jobs yet" in empty.text
    browser.find_element(By.ID, "new-job").click()
    _wait(browser).until(ec.url_to_be(f"{live_server.url}/training/new/"))

    # The newest ready file is preselected; the estimate is there for the default preset.
    assert Select(
        browser.find_element(By.NAME, "training_file")
    ).first_selected_option.get_attribute("value") == str(training_file.pk)
    assert browser.find_element(By.CSS_SELECTOR, "input[name=preset][value=balanced]").is_selected()
    _wait(browser).until(lambda b: _estimate_text(b) != "")
    balanced = _estimate_text(browser)
    assert "Validated:" in browser.find_element(By.ID, "file-check").text
    assert _console_errors(browser) == []
    _shoot_full_page(browser, "training-new.png")

    # Choosing Smoke updates the estimate through htmx, without leaving the page.
    browser.execute_script("window.__samePage = 'yes'")
    smoke_card = browser.find_element(By.CSS_SELECTOR, "input[name=preset][value=smoke]")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", smoke_card)
    smoke_card.click()
    _wait(browser).until(lambda b: _estimate_text(b) not in ("", balanced))
    assert browser.execute_script("return window.__samePage") == "yes"
    browser.find_element(By.NAME, "name").send_keys("Smoke from the form")
    browser.find_element(By.NAME, "tags").send_keys("smoke, browser")
    review = browser.find_element(By.ID, "review-job")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", review)
    review.click()

    # The review step, then Start.
    summary = _wait(browser).until(ec.visibility_of_element_located((By.ID, "review")))
    assert "Smoke from the form" in summary.text and "Smoke test" in summary.text
    assert not TrainingJob.objects.exists(), "the review must not create anything"
    _shoot_full_page(browser, "training-new-review.png")
    browser.find_element(By.ID, "start-job").click()
    _wait(browser).until(ec.url_matches(r"/training/[0-9a-f-]{36}/$"))
    job = TrainingJob.objects.get()
    assert job.name == "Smoke from the form" and job.preset.key == "smoke"
    assert job.tags == ["browser", "smoke"] and job.created_by == ada

    # Follow it to completed on its page, without a reload.
    browser.execute_script("window.__samePage = 'detail'")
    deadline = time.monotonic() + 900
    seen_running = False
    last_reconcile = 0.0
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.status == JobStatus.TRAINING and job.current_step:
            seen_running = True
            if not browser.execute_script("return window.__shotRunning"):
                chart = browser.execute_script(
                    "const c = window.crucibleJobChart && window.crucibleJobChart();"
                    "return c ? c.data.datasets[0].data.length : 0;"
                )
                if chart:
                    browser.execute_script("window.__shotRunning = true")
                    _shoot_full_page(browser, "training-detail-running.png")
        if browser.find_elements(By.ID, "job-results"):
            break
        if job.is_terminal and job.status != JobStatus.COMPLETED:
            raise AssertionError(f"{job.status}: {job.error_type} {job.error_message}")
        if time.monotonic() - last_reconcile > 3:
            services.training_jobs_reconcile()
            last_reconcile = time.monotonic()
        time.sleep(1)
    else:
        raise AssertionError(f"not completed on the page: {job.status} at {job.current_step}")
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED
    assert seen_running
    assert browser.execute_script("return window.__samePage") == "detail", "the page reloaded"
    badge = browser.find_element(By.CSS_SELECTOR, ".job-meta .badge")
    assert badge.text == "Completed"
    # The final chart: every logged step.
    _wait(browser).until(
        lambda b: (
            b.execute_script(
                "const c = window.crucibleJobChart && window.crucibleJobChart();"
                "return c ? c.data.datasets[0].data.length : 0;"
            )
            == job.current_step
        )
    )
    assert "Perplexity:" in browser.find_element(By.ID, "job-results").text
    assert _console_errors(browser) == []
    _shoot_full_page(browser, "training-detail-completed.png")

    # Download the adapters with the browser's session (in Python: in production mode the
    # link redirects to a pre-signed S3 URL on another origin, which fetch() could not read).
    import urllib.request
    import zipfile

    link = browser.find_element(
        By.CSS_SELECTOR, "#job-results a.download[href$='/download/adapters']"
    )
    cookies = "; ".join(f"{c['name']}={c['value']}" for c in browser.get_cookies())
    url = link.get_attribute("href")  # the live server's http:// URL
    request = urllib.request.Request(url, headers={"Cookie": cookies})  # noqa: S310
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
        assert response.status == 200
        archive = zipfile.ZipFile(io.BytesIO(response.read()))
    assert any(name.endswith("adapter_model.safetensors") for name in archive.namelist())
