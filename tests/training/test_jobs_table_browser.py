"""The jobs table fits a 1,400 px window: its last column (the row actions) is not cut off.

Headless Chromium (skipped without it, like the other browser tests). Screenshot in
var/screenshots/jobs-table-1400.png.
"""

from __future__ import annotations

import io

import pytest

from tests.browser.test_dashboard_browser import (  # noqa: F401 (fixtures)
    PASSWORD,
    _shoot,
    _sign_in,
    _wait,
    ada,
    browser,
    driver,
)
from tests.training.test_pages import seed_jobs

try:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
except ImportError:
    By = ec = None

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.mark.parametrize("width", [1400, 1440])
def test_jobs_table_shows_its_last_column_at_1400px(browser, live_server, ada, width):  # noqa: F811
    from corpora.services import training_file_create
    from tests.training.conftest import conversations
    from training.models import BaseModel, Preset

    training_file = training_file_create(
        name="advisor-v2", upload=io.BytesIO(conversations(12)), user=ada
    )
    seed_jobs(
        training_file,
        BaseModel.objects.get(name="SmolLM2-135M-Instruct"),
        Preset.objects.get(key="smoke"),
        user=ada,
    )
    browser.set_window_size(width, 900)
    _sign_in(browser, live_server, "ada", PASSWORD)
    browser.get(f"{live_server.url}/training/")
    _wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".jobs-table")))
    geometry = browser.execute_script(
        """
        const wrap = document.querySelector('.jobs-table').closest('.table-wrap');
        const last = document.querySelector('.jobs-table thead th:last-child');
        const cells = [...document.querySelectorAll('.jobs-table tbody td:last-child')];
        const box = wrap.getBoundingClientRect();
        return {
          wrapRight: box.right, scrollWidth: wrap.scrollWidth, clientWidth: wrap.clientWidth,
          viewport: document.documentElement.clientWidth,
          pageScroll: document.documentElement.scrollWidth,
          lastRight: last.getBoundingClientRect().right,
          cellRight: Math.max(...cells.map(c => c.getBoundingClientRect().right)),
        };
        """
    )
    _shoot(browser, f"jobs-table-{width}.png")
    assert geometry["scrollWidth"] <= geometry["clientWidth"] + 1, geometry
    assert geometry["lastRight"] <= geometry["wrapRight"] + 1, geometry
    assert geometry["cellRight"] <= geometry["viewport"], geometry
    assert geometry["pageScroll"] <= geometry["viewport"] + 1, geometry


def test_new_job_preset_cards_show_the_chosen_files_figures(browser, live_server, ada):  # noqa: F811
    from corpora.services import training_file_create
    from tests.training.conftest import conversations

    training_file_create(name="advisor-v2", upload=io.BytesIO(conversations(12)), user=ada)
    browser.set_window_size(1400, 1100)
    _sign_in(browser, live_server, "ada", PASSWORD)
    browser.get(f"{live_server.url}/training/new/")
    figures = _wait(browser).until(
        ec.visibility_of_element_located((By.ID, "preset-figures-balanced"))
    )
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", figures)
    _shoot(browser, "new-job-preset-cards.png")
    assert "On advisor-v2:" in figures.text and "step" in figures.text
