"""The Datasets pages in headless Chromium: upload with progress, browse, export.

Uses the browser fixtures of tests/browser, re-exported by tests/corpora/conftest.py
(skipped when Chromium is not installed).
Screenshots land in var/screenshots/datasets-*.png.
"""

import io
import json

import pytest

from corpora.services import corpus_create, export_create, training_file_create
from corpora.tasks import export_run_task
from tests.browser.test_dashboard_browser import (
    PASSWORD,
    _console_errors,
    _shoot,
    _sign_in,
    _wait,
)
from tests.corpora.conftest import document, jsonl
from tests.corpora.test_commands import SAMPLES

try:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
except ImportError:  # the driver fixture skips
    By = ec = None

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def _shoot_page(window, name: str) -> None:
    """A screenshot of the whole page (the window grown to its height), then back."""
    width, height = window.get_window_size().values()
    full = window.execute_script("return document.documentElement.scrollHeight")
    window.set_window_size(width, min(max(full, height), 4000))
    _shoot(window, name)
    window.set_window_size(width, height)


@pytest.fixture
def datasets(ada, tmp_path, monkeypatch):
    # live_server tests commit for real: run the export here rather than queueing it on
    # the configured broker.
    monkeypatch.setattr(export_run_task, "delay", lambda *args, **kwargs: None)
    samples = (SAMPLES / "speeches.jsonl").read_bytes()
    sample = corpus_create(
        name="Consequential speeches",
        description="Built from samples/corpus/texts with build_corpus",
        upload=io.BytesIO(samples),
        user=ada,
    )
    big = corpus_create(
        name="Moon decade",
        upload=io.BytesIO(jsonl(*(document(i) for i in range(60)))),
        user=ada,
    )
    chat = b"".join(
        json.dumps(
            {
                "id": f"c{i}",
                "system_prompt": "You are a calm financial advisor.",
                "training_pairs": [
                    {
                        "user_input": f"How do I save for goal {i}?",
                        "target_response": "Start small.",
                    }
                ],
                "metadata": {"topic": "saving", "quality_score": 4 + i % 2 * 0.5},
            }
        ).encode()
        + b"\n"
        for i in range(12)
    )
    training_file_create(name="Advisor conversations", upload=io.BytesIO(chat), user=ada)
    export = export_create(
        user=ada, corpus=big, formats=["jsonl", "csv", "hf"], stratify_by="document_type"
    )
    export_run_task(str(export.pk))
    return {"sample": sample, "big": big, "export": export}


def test_datasets_pages(browser, live_server, ada, datasets, tmp_path):
    _sign_in(browser, live_server, "ada", PASSWORD)
    _wait(browser).until(ec.url_to_be(f"{live_server.url}/"))
    browser.get(f"{live_server.url}/datasets/")
    _wait(browser).until(ec.text_to_be_present_in_element((By.TAG_NAME, "h1"), "Datasets"))
    active = browser.find_element(By.CSS_SELECTOR, ".nav-link[aria-current=page]")
    assert active.text == "Datasets"
    table = browser.find_element(By.ID, "corpora-table")
    assert "Consequential speeches" in table.text and "Moon decade" in table.text
    assert "Advisor conversations" in browser.find_element(By.ID, "training-files-table").text
    _shoot_page(browser, "datasets-index.png")

    # Upload through the form: progress bar, then the result panel.
    upload = tmp_path / "more-speeches.jsonl"
    upload.write_bytes(jsonl(*(document(i) for i in range(200, 1200))))
    browser.find_element(By.ID, "id_file").send_keys(str(upload))
    browser.find_element(By.ID, "id_name").send_keys("Uploaded in the browser")
    browser.find_element(By.ID, "id_description").send_keys("1,000 records, through htmx")
    browser.find_element(By.CSS_SELECTOR, "#upload-form button[type=submit]").click()
    ok = _wait(browser).until(ec.visibility_of_element_located((By.ID, "upload-ok")))
    assert "1,000 documents" in ok.text
    _wait(browser).until(
        ec.text_to_be_present_in_element((By.ID, "corpora-table"), "Uploaded in the browser")
    )
    assert browser.find_element(By.ID, "upload-phase").text == "Stored"
    assert browser.find_element(By.ID, "upload-bar").get_attribute("style") == "width: 100%;"
    _shoot_page(browser, "datasets-upload-done.png")

    # A broken file: the errors by line, nothing stored.
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(jsonl(document(1)) + b'{"id": "x", "text": "cut')
    browser.find_element(By.ID, "id_file").send_keys(str(broken))
    browser.find_element(By.CSS_SELECTOR, "#upload-form button[type=submit]").click()
    errors = _wait(browser).until(ec.visibility_of_element_located((By.ID, "upload-errors")))
    assert "truncated line" in errors.text and "2" in errors.text
    assert browser.find_element(By.ID, "upload-phase").text == "Refused: nothing was stored"
    # The only console entry: the 422 answer itself (the browser logs every 4xx).
    assert all("422" in entry for entry in _console_errors(browser))
    _shoot_page(browser, "datasets-upload-errors.png")

    # Corpus page, documents filtered by metadata through htmx.
    sample = datasets["sample"]
    browser.get(f"{live_server.url}/datasets/corpora/{sample.pk}/")
    _wait(browser).until(ec.presence_of_element_located((By.ID, "documents-table")))
    rows = browser.find_elements(By.CSS_SELECTOR, "#documents-table tbody tr")
    assert len(rows) == 4
    _shoot_page(browser, "datasets-corpus.png")
    browser.find_element(By.ID, "f-meta").send_keys("topic:space")
    _wait(browser).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, "#documents-table tbody tr")) == 1
    )
    assert "Rice University" in browser.find_element(By.ID, "documents-table").text
    browser.find_element(By.CSS_SELECTOR, "#documents-table a").click()
    _wait(browser).until(ec.presence_of_element_located((By.ID, "document-metadata")))
    assert "We choose to go to the Moon" in browser.find_element(By.ID, "document-text").text
    assert len(browser.find_elements(By.CSS_SELECTOR, ".chunk-item")) >= 2
    _shoot_page(browser, "datasets-document.png")

    browser.get(f"{live_server.url}/datasets/corpora/{sample.pk}/?tab=chunks")
    _wait(browser).until(ec.presence_of_element_located((By.ID, "chunks-table")))
    _shoot_page(browser, "datasets-chunks.png")

    browser.get(f"{live_server.url}/datasets/exports/")
    _wait(browser).until(ec.presence_of_element_located((By.ID, "export-form")))
    assert "1.0.0" in browser.find_element(By.ID, "exports-table").text
    _shoot_page(browser, "datasets-exports.png")
    browser.get(f"{live_server.url}/datasets/exports/{datasets['export'].pk}/")
    files = _wait(browser).until(ec.presence_of_element_located((By.ID, "export-files")))
    assert "hf/README.md" in files.text and "manifest.json" in files.text
    _shoot_page(browser, "datasets-export-detail.png")

    browser.set_window_size(820, 1100)
    browser.get(f"{live_server.url}/datasets/")
    _wait(browser).until(ec.presence_of_element_located((By.ID, "corpora-table")))
    _shoot(browser, "datasets-index-tablet.png")
    assert _console_errors(browser) == []
