# ruff: noqa: F811 (the browser fixtures are imported, then taken as parameters)
"""The RAG explorer in headless Chromium: ask (retrieval in progress, then generation in
progress, then the cited answer with its evidence panel), the no-context state, and
knowledge-base management (create from a corpus, build progress, ready).

Embeddings: the offline MiniLM through the gateway; answers: the loopback OpenAI server,
scripted to cite source 1 and slowed so the generation state can be seen. Screenshots land
in var/screenshots/rag-*.png.
"""

from __future__ import annotations

import importlib
import io
import os
import time
from pathlib import Path

import pytest

from tests.browser.test_dashboard_browser import (  # noqa: F401
    PASSWORD,
    _console_errors,
    _shoot,
    _sign_in,
    _wait,
    ada,
    browser,
    driver,
)
from tests.jobs.openai_server import OpenAIServer

try:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
except ImportError:  # the driver fixture skips
    By = ec = None

pytest_plugins = ["tests.jobs.openai_server"]
pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

REPO = Path(__file__).resolve().parents[2]
QUESTION = "What is the only thing we have to fear?"


def _shoot_page(window, name: str) -> None:
    width, height = window.get_window_size().values()
    full = window.execute_script("return document.documentElement.scrollHeight")
    window.set_window_size(width, min(max(full, height), 4000))
    _shoot(window, name)
    window.set_window_size(width, height)


@pytest.fixture
def rag_setup(ada, settings, tmp_path, monkeypatch, openai_server, loopback_model):
    from corpora import services as corpus_services
    from corpora.rag import index as vindex
    from corpora.rag import services as rag
    from corpora.tasks import knowledge_base_build_task

    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(tmp_path / "media")},
        },
    }
    settings.TRAINING_MODEL_CACHE = os.environ.get(
        "CRUCIBLE_MODEL_CACHE", str(REPO / "var" / "models")
    )
    settings.GATEWAY_OFFLINE_DEVICE = "cpu"
    vindex.cache.clear()
    # A transactional test flushed the data migration's rows: register the offline models again.
    from django.apps import apps

    importlib.import_module("jobs.migrations.0002_offline_provider").register(apps, None)
    # Builds run here, by the test, instead of on the configured broker.
    monkeypatch.setattr(knowledge_base_build_task, "delay", lambda *a, **k: None)

    def completion(body: dict) -> dict:
        time.sleep(1.5)  # generation takes a moment: the page shows it
        out = OpenAIServer.completion(body)
        out["choices"][0]["message"]["content"] = (
            "The only thing we have to fear is fear itself [1]."
        )
        return out

    openai_server.completion = completion
    real_retrieve = rag.rag_retrieve

    def slow_retrieve(**kwargs):
        time.sleep(1.0)  # so that the retrieval state can be photographed
        return real_retrieve(**kwargs)

    monkeypatch.setattr(rag, "rag_retrieve", slow_retrieve)
    corpus = corpus_services.corpus_create(
        name="Consequential speeches",
        upload=io.BytesIO((REPO / "samples/corpus/speeches.jsonl").read_bytes()),
        user=ada,
    )
    kb = rag.knowledge_base_create(name="Speeches", corpus_ids=[corpus.pk], user=ada)
    rag.knowledge_base_refresh(kb_id=kb.pk)
    return {"corpus": corpus, "kb": kb, "model": loopback_model.key, "rag": rag}


def test_ask_retrieve_then_generate_with_evidence(browser, live_server, rag_setup):
    _sign_in(browser, live_server, "ada", PASSWORD)
    _wait(browser).until(ec.url_to_be(f"{live_server.url}/"))
    browser.get(f"{live_server.url}/datasets/rag/")
    _wait(browser).until(ec.text_to_be_present_in_element((By.TAG_NAME, "h1"), "RAG explorer"))
    active = browser.find_elements(By.CSS_SELECTOR, ".nav-sublink[aria-current=page]")
    assert [a.text for a in active] == ["RAG explorer"]
    assert "Speeches" in browser.find_element(By.ID, "kb-table").text
    assert "exact numpy" in browser.find_element(By.ID, "kb-table").text
    browser.find_element(By.CSS_SELECTOR, f"#id_model option[value='{rag_setup['model']}']").click()
    browser.find_element(By.ID, "id_question").send_keys(QUESTION)
    browser.find_element(By.ID, "ask-button").click()

    # State 1: retrieval in progress (the indicator), no answer yet.
    _wait(browser).until(ec.visibility_of_element_located((By.ID, "retrieving")))
    assert "Retrieving context" in browser.find_element(By.ID, "retrieving").text
    _shoot(browser, "rag-1-retrieving.png")
    # State 2: contexts found, generation in progress (a separate request).
    generating = _wait(browser).until(ec.visibility_of_element_located((By.ID, "generating")))
    assert "Generating the answer" in generating.text
    assert not browser.find_element(By.ID, "retrieving").is_displayed()
    assert "First Inaugural Address" in browser.find_element(By.ID, "retrieved-list").text
    _shoot(browser, "rag-2-generating.png")
    # State 3: the answer, its citation linked to the evidence panel.
    answer = _wait(browser).until(ec.visibility_of_element_located((By.ID, "answer-text")))
    assert answer.text == "The only thing we have to fear is fear itself [1]."
    assert not browser.find_elements(By.ID, "generating")
    assert "grounded" in browser.find_element(By.ID, "answer").text
    evidence = browser.find_element(By.ID, "evidence-1")
    assert evidence.get_attribute("open") is None
    answer.find_element(By.CSS_SELECTOR, "a.rag-cite").click()
    _wait(browser).until(lambda b: b.find_element(By.ID, "evidence-1").get_attribute("open"))
    text = evidence.text
    assert "fear itself" in text and "characters 284" in text and "Open document" in text
    _shoot_page(browser, "rag-3-answer.png")
    evidence.find_element(By.PARTIAL_LINK_TEXT, "Open document").click()
    _wait(browser).until(ec.url_contains("/documents/"))
    assert "First Inaugural Address" in browser.find_element(By.TAG_NAME, "h1").text
    assert _console_errors(browser) == []


def test_no_context_and_index_management(browser, live_server, rag_setup):
    _sign_in(browser, live_server, "ada", PASSWORD)
    _wait(browser).until(ec.url_to_be(f"{live_server.url}/"))
    browser.get(f"{live_server.url}/datasets/rag/")
    browser.find_element(By.ID, "id_question").send_keys("How do I bake sourdough bread?")
    browser.find_element(By.ID, "ask-button").click()
    state = _wait(browser).until(ec.visibility_of_element_located((By.ID, "no-context")))
    assert "No relevant context found" in state.text and "no model was called" in state.text
    assert not browser.find_elements(By.ID, "generating")
    _shoot(browser, "rag-4-no-context.png")

    form = browser.find_element(By.ID, "kb-form")
    form.find_element(By.ID, "id_kb_name").send_keys("Moon only")
    form.find_element(By.CSS_SELECTOR, "input[name=corpora]").click()
    form.find_element(By.ID, "id_filter").send_keys("topic=space")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait(browser).until(
        ec.text_to_be_present_in_element((By.ID, "rag-indexes"), "'Moon only' is building")
    )
    table = browser.execute_script("return document.getElementById('kb-table').innerText")
    assert "Building" in table and "Queued" in table
    _shoot_page(browser, "rag-5-building.png")
    from corpora.models import KnowledgeBase

    kb = KnowledgeBase.objects.get(name="Moon only")
    rag_setup["rag"].knowledge_base_refresh(kb_id=kb.pk)

    # The table polls while a build runs: it turns Ready on its own.
    # Read the text in one script call: htmx swaps the table while it polls, and an element
    # found first and read later can be stale by then.
    def text_of(element_id: str) -> str:
        return browser.execute_script(
            "const e = document.getElementById(arguments[0]); return e ? e.innerText : '';",
            element_id,
        )

    _wait(browser).until(lambda b: "Building" not in text_of("kb-table"))
    row = text_of(f"kb-{kb.pk}")
    assert "Ready" in row and "4" in row and "topic=space" in row
    _shoot_page(browser, "rag-6-ready.png")
    assert _console_errors(browser) == []
