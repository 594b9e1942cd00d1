"""The evaluation pages in headless Chromium (issue 17): the single-evaluation history (empty,
then filled), a result with its scores, the batch evaluations list and detail in every state
(queued, running with partial aggregates, completed, failed, cancelled), the drill-down
behind a taxonomy count and a score bin, and the metrics dashboard. Every batch is created
and run through the real services against the loopback OpenAI-compatible server (the judge
scripted to refuse, garble; answers failing with 400s and timeouts). Screenshots in
var/screenshots/evals-*.png."""
# ruff: noqa: F811  (fixtures imported from other modules are redefined as arguments)

from __future__ import annotations

import io
import json

import pytest

from tests.browser.test_dashboard_browser import (  # noqa: F401 (fixtures)
    PASSWORD,
    _console_errors,
    _sign_in,
    _stylesheet_applied,
    _wait,
    ada,
    browser,
    driver,
)
from tests.browser.test_training_browser import _shoot_full_page
from tests.evaluation.test_batch_evals import scripted, second_loopback  # noqa: F401
from tests.jobs.openai_server import (  # noqa: F401 (fixtures)
    fast_gateway,
    loopback_model,
    openai_server,
)

try:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
except ImportError:  # the driver fixture skips (or fails when required)
    pass

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# Tags the scripted loopback server reacts to (tests/evaluation/test_batch_evals.py):
# the judge refuses / answers prose; the answering call gets a 400 / times out.
FAULTS = {2: "REFUSE", 5: "GARBLE", 7: "BADREQ", 9: "SLOW", 10: "REFUSE"}
OFF_TOPIC = {1, 6}  # a reference the echoed answer does not match: below threshold


def _rows(n: int, faults: dict[int, str], tag_all: str = "") -> list[dict]:
    rows = []
    for i in range(n):
        fact = f"Item {i} is stored in bin {i % 7}."
        tag = tag_all or faults.get(i, "")
        rows.append(
            {
                "id": f"s{i}",
                "input": f"{tag} Item {i} is stored in bin {i % 7}.".strip(),
                "reference": "Parcels ship on Tuesdays only." if i in OFF_TOPIC else fact,
                "contexts": [fact, "Bins are numbered from zero."],
            }
        )
    return rows


def _dataset(user, name: str, rows: list[dict]):
    from evaluation.evals import datasets

    body = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    return datasets.dataset_create(user=user, name=name, stream=io.BytesIO(body))


def _singles(user, judge: str) -> dict:
    """Three single evaluations: a pass, one below threshold, one the judge refused."""
    from evaluation.evals import services

    fact = "The Eiffel Tower is 330 metres tall."
    common = {"user": user, "reference": fact, "contexts": [fact], "embed_model": None}
    return {
        "pass": services.evaluation_create(
            rubric="grounded_qa",
            input="How tall is the Eiffel Tower?",
            output="The Eiffel Tower is 330 metres tall.",
            **common,
        ),
        "below": services.evaluation_create(
            rubric="grounded_qa",
            input="How tall is the Eiffel Tower?",
            output="It was painted yellow in 1899 by Gustave.",
            **common,
        ),
        "refused": services.evaluation_create(
            rubric="grounded_qa_judged",
            input="REFUSE How tall is the Eiffel Tower?",
            output="The Eiffel Tower is 330 metres tall.",
            judge_model=judge,
            **common,
        ),
    }


def _batches(user, loop: str, loop_b: str) -> dict:
    """One batch evaluation in each state, through the services and the batch engine."""
    from evaluation.evals import services
    from jobs.batch.services import task_run

    bins = _dataset(user, "bins", _rows(12, FAULTS))
    clean = _dataset(user, "clean", _rows(12, {}))
    broken = _dataset(user, "broken", _rows(3, {}, tag_all="BADREQ"))
    cheap = {"user": user, "rubric": "grounded_qa", "embed_model": None}

    completed = services.batch_eval_create(
        dataset_id=bins.pk,
        models=[loop_b, loop],
        rubric="grounded_qa_judged",
        judge_model=loop,
        embed_model=None,
        user=user,
        name="Judged bins, two models",
        decoding={"max_tokens": 16},
        enqueue=False,
    )
    services.batch_eval_run_inline(batch=completed)

    failed = services.batch_eval_create(
        dataset_id=broken.pk,
        models=[loop],
        name="Every answer rejected (400)",
        enqueue=False,
        **cheap,
    )
    services.batch_eval_run_inline(batch=failed)

    running = services.batch_eval_create(
        dataset_id=clean.pk, models=[loop], name="Clean bins, in progress", **cheap
    )
    for item in running.items.order_by("sample_index")[:5]:
        task_run(task_id=item.task_id, dispatch=False, finish=False)

    cancelled = services.batch_eval_create(
        dataset_id=clean.pk, models=[loop], runs=2, name="Clean bins, cancelled", **cheap
    )
    for item in cancelled.items.order_by("sample_index", "run")[:3]:
        task_run(task_id=item.task_id, dispatch=False, finish=False)
    services.batch_eval_cancel(batch=cancelled)

    queued = services.batch_eval_create(
        dataset_id=clean.pk, models=[loop], name="Clean bins, waiting", enqueue=False, **cheap
    )
    out = {}
    for key, batch in [
        ("completed", completed),
        ("failed", failed),
        ("running", running),
        ("cancelled", cancelled),
        ("queued", queued),
    ]:
        batch.refresh_from_db()
        out[key] = batch
    return out


def _text(browser, css: str) -> str:
    return browser.find_element(By.CSS_SELECTOR, css).text


def _listed_items(browser) -> set[str]:
    return {
        row.get_attribute("data-item")
        for row in browser.find_elements(By.CSS_SELECTOR, "#samples tr[data-item]")
    }


def _no_page_overflow(browser) -> bool:
    """Nothing wider than the window: wide tables scroll inside their own box."""
    return browser.execute_script(
        "return document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    )


def test_eval_pages_in_every_state(browser, live_server, ada, scripted, second_loopback):
    from django.db.models import Count

    from evaluation.models import EvalRun
    from jobs.batch.services import task_run

    _sign_in(browser, live_server, "ada", PASSWORD)
    _wait(browser).until(ec.url_to_be(f"{live_server.url}/"))

    # --- Empty states ---------------------------------------------------------------------
    browser.get(f"{live_server.url}/evals/")
    _wait(browser).until(ec.presence_of_element_located((By.ID, "eval-history")))
    assert _stylesheet_applied(browser)
    assert "No evaluations yet" in _text(browser, "#eval-history")
    _shoot_full_page(browser, "evals-history-empty.png")
    browser.get(f"{live_server.url}/evals/batches/")
    assert "No batch evaluations yet" in _text(browser, "#batch-evals")
    _shoot_full_page(browser, "evals-batches-empty.png")
    browser.get(f"{live_server.url}/evals/dashboard/")
    banner = browser.find_element(By.ID, "health-banner")
    # No worker runs here: the banner says so.
    assert banner.get_attribute("data-health") == "degraded" and "workers" in banner.text
    assert "No completed batch evaluations yet" in browser.page_source
    _shoot_full_page(browser, "evals-dashboard-empty.png")

    singles = _singles(ada, scripted.key)
    batches = _batches(ada, scripted.key, second_loopback)
    assert {k: b.status for k, b in batches.items()} == {k: k for k in batches}

    # --- History and a result -------------------------------------------------------------
    browser.get(f"{live_server.url}/evals/")
    rows = browser.find_elements(By.CSS_SELECTOR, "#eval-history tr[data-run]")
    assert len(rows) == 3
    by_run = {r.get_attribute("data-run"): r for r in rows}
    assert by_run[str(singles["pass"].pk)].get_attribute("data-result") == "pass"
    assert "Pass" in by_run[str(singles["pass"].pk)].text
    assert "1.00 1.00 0.00" in by_run[str(singles["pass"].pk)].text
    assert "Below threshold" in by_run[str(singles["below"].pk)].text
    refused = by_run[str(singles["refused"].pk)]
    assert "Judge refusal" in refused.text and "no grade" in refused.text
    assert "No evaluations yet" not in browser.page_source
    _shoot_full_page(browser, "evals-history.png")

    by_run[str(singles["pass"].pk)].find_element(By.TAG_NAME, "a").click()
    _wait(browser).until(ec.presence_of_element_located((By.ID, "scores")))
    assert _text(browser, "[data-result]") == "Pass"
    cards = {
        c.get_attribute("data-dimension"): c
        for c in browser.find_elements(By.CSS_SELECTOR, "#scores [data-dimension]")
    }
    assert list(cards) == ["correctness", "faithfulness", "hallucination"]
    expected = {"correctness": "1.00", "faithfulness": "1.00", "hallucination": "0.00"}
    for key, value in expected.items():
        assert cards[key].find_element(By.CSS_SELECTOR, "[data-value]").text == value
        assert "Pass" in cards[key].text
    assert "lower is better" in cards["hallucination"].text
    _shoot_full_page(browser, "evals-run-pass.png")

    browser.get(f"{live_server.url}/evals/runs/{singles['refused'].pk}/")
    assert _text(browser, "[data-result]") == "Judge refusal"
    assert "No grade" in _text(browser, "[data-dimension=faithfulness]")
    assert "Not scored" in _text(browser, "[data-dimension=correctness]")
    assert browser.find_elements(By.CSS_SELECTOR, "details[data-judge]")
    _shoot_full_page(browser, "evals-run-refused.png")

    # --- The list of batch evaluations ----------------------------------------------------
    browser.get(f"{live_server.url}/evals/batches/")
    listed = {
        r.get_attribute("data-status"): r
        for r in browser.find_elements(By.CSS_SELECTOR, "#batch-evals tr[data-batch]")
    }
    assert set(listed) == {"queued", "running", "completed", "failed", "cancelled"}
    progress = {
        k: r.find_element(By.CSS_SELECTOR, "[data-progress]").text for k, r in listed.items()
    }
    assert progress["queued"].startswith("0 / 12") and progress["running"].startswith("5 / 12")
    assert progress["completed"].startswith("24 / 24") and progress["failed"].startswith("3 / 3")
    assert progress["cancelled"].startswith("3 / 24") and "21 cancelled" in progress["cancelled"]
    completed = batches["completed"]
    items = EvalRun.objects.filter(batch=completed)
    decided = items.exclude(passed__isnull=True).count()
    rate = f"{100 * items.filter(passed=True).count() / decided:.1f}%"
    assert (
        listed["completed"].find_element(By.CSS_SELECTOR, "[data-pass-rate]").text.startswith(rate)
    )
    _shoot_full_page(browser, "evals-batches.png")

    # --- A completed batch: aggregates, taxonomy and the drill-down behind them ------------
    listed["completed"].find_element(By.LINK_TEXT, completed.name).click()
    _wait(browser).until(ec.presence_of_element_located((By.ID, "taxonomy")))
    assert _text(browser, "[data-batch-status]") == "Completed"
    assert _text(browser, "[data-progress]") == "24 / 24"
    assert _text(browser, "[data-stat=pass-rate] [data-pass-rate]") == rate
    assert _text(browser, "[data-pass-ci]").startswith("95% CI ")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#per-model tr[data-model]")) == 2
    assert browser.find_elements(By.CSS_SELECTOR, "[data-comparison]")
    counts = dict(items.exclude(failure="").values_list("failure").annotate(n=Count("pk")))
    assert {"judge_refusal", "invalid_output", "timeout", "provider_error"} <= set(counts)
    shown = {
        r.get_attribute("data-failure"): int(r.find_element(By.CSS_SELECTOR, "[data-count]").text)
        for r in browser.find_elements(By.CSS_SELECTOR, "#taxonomy tr[data-failure]")
    }
    assert shown == {code: counts.get(code, 0) for code in shown}
    assert _no_page_overflow(browser)
    _shoot_full_page(browser, "evals-batch-completed.png")
    browser.set_window_size(1024, 900)  # a laptop: the wide table scrolls inside its card
    assert _no_page_overflow(browser)
    browser.set_window_size(1440, 900)

    browser.find_element(By.CSS_SELECTOR, "#taxonomy tr[data-failure=judge_refusal] a").click()
    _wait(browser).until(ec.presence_of_element_located((By.ID, "samples")))
    assert "Failure: Judge refusal" in _text(browser, "#filters")
    assert _listed_items(browser) == {
        str(pk) for pk in items.filter(failure="judge_refusal").values_list("pk", flat=True)
    }
    _shoot_full_page(browser, "evals-samples-failure.png")

    # A score bin: the tallest correctness bar lists exactly the items scored inside it.
    browser.back()
    _wait(browser).until(ec.presence_of_element_located((By.ID, "taxonomy")))
    bars = browser.find_elements(By.CSS_SELECTOR, "[data-histogram=correctness] a.histo-bin")
    tallest = max(bars, key=lambda b: int(b.find_element(By.CSS_SELECTOR, ".histo-count").text))
    in_bar = int(tallest.find_element(By.CSS_SELECTOR, ".histo-count").text)
    low, high = (float(tallest.get_attribute(a)) for a in ("data-bin", "data-bin-high"))
    tallest.click()
    _wait(browser).until(ec.presence_of_element_located((By.ID, "samples")))
    assert "Correctness in [" in _text(browser, "#filters")
    inside = {
        str(r.pk)
        for r in items
        if (r.scores.get("correctness") or {}).get("value") is not None
        and (
            low <= r.scores["correctness"]["value"] < high
            or high == 1.0 == r.scores["correctness"]["value"]
        )
    }
    assert _listed_items(browser) == inside and len(inside) == in_bar
    _shoot_full_page(browser, "evals-samples-bin.png")

    timed_out = items.filter(failure="timeout").first()
    browser.find_element(By.LINK_TEXT, "Clear filters").click()
    _wait(browser).until(ec.text_to_be_present_in_element((By.ID, "filters"), "Every item"))
    assert len(_listed_items(browser)) == 24
    browser.find_element(By.CSS_SELECTOR, f"tr[data-item='{timed_out.pk}'] a").click()
    _wait(browser).until(ec.presence_of_element_located((By.ID, "scores")))
    assert _text(browser, "[data-result]") == "Timeout"
    assert "did not answer" in _text(browser, "[data-error]")
    _shoot_full_page(browser, "evals-run-item.png")

    # --- Running: partial aggregates that refresh themselves -------------------------------
    running = batches["running"]
    browser.get(f"{live_server.url}/evals/batches/{running.pk}/")
    assert _text(browser, "[data-batch-status]") == "Running"
    assert _text(browser, "[data-progress]") == "5 / 12"
    assert "Pass rate so far" in _text(browser, "[data-stat=pass-rate]")
    assert "partial aggregates" in _text(browser, "[data-stat=status]")
    _shoot_full_page(browser, "evals-batch-running.png")
    for item in running.items.filter(status="pending").order_by("sample_index")[:2]:
        task_run(task_id=item.task_id, dispatch=False, finish=False)
    _wait(browser).until(
        ec.text_to_be_present_in_element((By.CSS_SELECTOR, "[data-progress]"), "7 / 12")
    )

    # --- Queued, failed, cancelled ---------------------------------------------------------
    browser.get(f"{live_server.url}/evals/batches/{batches['queued'].pk}/")
    assert _text(browser, "[data-batch-status]") == "Queued"
    assert "Waiting for a worker" in _text(browser, "[data-state-note]")
    assert "No results yet" in _text(browser, "[data-no-results]")
    _shoot_full_page(browser, "evals-batch-queued.png")

    browser.get(f"{live_server.url}/evals/batches/{batches['failed'].pk}/")
    assert _text(browser, "[data-batch-status]") == "Failed"
    assert "Every item failed" in _text(browser, "[data-state-note]")
    assert _text(browser, "#taxonomy tr[data-failure=provider_error] [data-count]") == "3"
    _shoot_full_page(browser, "evals-batch-failed.png")

    browser.get(f"{live_server.url}/evals/batches/{batches['cancelled'].pk}/")
    assert _text(browser, "[data-batch-status]") == "Cancelled"
    assert _text(browser, "[data-progress]") == "3 / 24"
    assert "21 did not run" in _text(browser, "[data-state-note]")
    assert not browser.find_elements(By.CSS_SELECTOR, "[data-action=cancel]")
    _shoot_full_page(browser, "evals-batch-cancelled.png")

    # --- The metrics dashboard -------------------------------------------------------------
    from config.tasks import worker_heartbeat

    worker_heartbeat()  # what a worker does every minute
    browser.get(f"{live_server.url}/evals/dashboard/")
    _wait(browser).until(
        lambda b: b.execute_script(
            "return !!(window.Chart && Chart.getChart('latency-chart')"
            " && Chart.getChart('error-chart'))"
        )
    )
    banner = browser.find_element(By.ID, "health-banner")
    assert banner.get_attribute("data-health") == "ok", banner.text
    assert "All systems operational" in banner.text
    assert _text(browser, "[data-kpi=evals] .stat-value") == "33.3%"  # 1 of the 3 singles
    assert "n=3" in _text(browser, "[data-kpi=evals]")
    outcome = browser.find_element(By.CSS_SELECTOR, f"#outcomes tr[data-batch='{completed.pk}']")
    assert completed.name in outcome.text and rate in outcome.text
    assert browser.find_elements(
        By.CSS_SELECTOR, f"#gateway-models tr[data-model='{scripted.key}']"
    )
    labels = browser.execute_script("return Chart.getChart('latency-chart').data.labels")
    assert labels and not any("<" in label for label in labels), labels
    assert _no_page_overflow(browser)
    _shoot_full_page(browser, "evals-dashboard.png")
    assert _console_errors(browser) == []
