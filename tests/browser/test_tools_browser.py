"""Compare, templates and playground in headless Chromium.

Compare two completed jobs (overlaid curves, best values marked, CSV link), save one as a
template and start a job from it in one click, then ask the playground (its generation stood
in for; the real one is tests/training/test_playground.py's slow test). Screenshots land in
var/screenshots/tools-*.png.
"""

from __future__ import annotations

import io
import threading

import pytest

from tests.browser.test_dashboard_browser import (  # noqa: F401 (fixtures)
    PASSWORD,
    _console_errors,
    _shoot,
    _sign_in,
    _wait,
    ada,
    browser,
    driver,
)
from tests.browser.test_training_browser import _shoot_full_page

try:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
except ImportError:  # the driver fixture skips (or fails when browsers are required)
    By = ec = None

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def two_jobs(ada):  # noqa: F811
    from corpora.services import training_file_create
    from tests.training.conftest import conversations
    from tests.training.test_pages import completed_job
    from training.models import BaseModel, Preset, TrainingJob

    training_file = training_file_create(
        name="advisor-v2", upload=io.BytesIO(conversations(12)), user=ada
    )
    base = BaseModel.objects.get(name="SmolLM2-135M-Instruct")
    smoke = Preset.objects.get(key="smoke")
    a = completed_job(training_file, base, smoke, user=ada, name="Advisor r16 (balanced)")
    b = completed_job(training_file, base, smoke, user=ada, name="Advisor r32 lr 3e-4", steps=45)
    config = {**b.configuration}
    config["hyperparameters"] = {
        **config["hyperparameters"],
        "lora_r": 32,
        "lora_alpha": 64,
        "learning_rate": 3e-4,
    }
    TrainingJob.objects.filter(pk=b.pk).update(
        configuration=config, final_val_loss=1.2712, perplexity_trained=15.4, cost_actual=0.61
    )
    return a, TrainingJob.objects.get(pk=b.pk)


def _fake_generation(monkeypatch):
    """The playground task runs a moment later in a thread, with a stand-in generator."""
    from django.db import connection

    from training import playground, services, tasks

    def generate_pair(**kwargs):
        kwargs["stage"]("Generating with the adapter")
        return playground.PairResult(
            base_output="Saving money is a good idea. You can save money by spending less.",
            adapter_output=(
                "Start small and make it automatic: a standing order of 10% on payday into a "
                "separate account. Once three months of expenses are covered, we can talk "
                "about investing the rest."
            ),
            device="cpu",
            timings={
                "load_base_s": 1.8,
                "load_adapter_s": 0.2,
                "base_generate_s": 2.4,
                "adapter_generate_s": 3.1,
            },
            token_counts={"base": 17, "adapter": 44},
        )

    def later(run_id):
        def work():
            try:
                services.playground_run_execute(run_id=run_id)
            finally:
                connection.close()

        threading.Timer(1.5, work).start()

    monkeypatch.setattr(playground, "generate_pair", generate_pair)
    monkeypatch.setattr(tasks.run_playground, "delay", later)


def test_compare_templates_and_playground(browser, live_server, ada, two_jobs, monkeypatch):  # noqa: F811
    from training.models import JobStatus, JobTemplate, TrainingJob

    monkeypatch.setattr("training.services._enqueue_launch", lambda job: None)
    a, b = two_jobs
    _sign_in(browser, live_server, "ada", PASSWORD)
    _wait(browser).until(ec.url_to_be(f"{live_server.url}/"))

    # --- Compare: pick two jobs in the list -----------------------------------------------
    browser.get(f"{live_server.url}/training/compare/")
    submit = _wait(browser).until(ec.presence_of_element_located((By.ID, "compare-submit")))
    assert not submit.is_enabled()  # nothing picked yet
    browser.find_element(By.ID, f"pick-{a.pk}").click()
    assert not submit.is_enabled()
    browser.find_element(By.ID, f"pick-{b.pk}").click()
    assert submit.is_enabled()
    assert browser.find_element(By.ID, "pick-count").text == "2 of 4 selected"
    submit.click()
    _wait(browser).until(
        lambda d: (
            d.execute_script(
                "return window.Chart && Chart.getChart('compare-chart') ? "
                "Chart.getChart('compare-chart').data.datasets.map(d => d.data.length).sort((x, y) => x - y)"
                " : null"
            )
            == [4, 6, 45, 60]
        )
    )
    best = browser.find_element(
        By.CSS_SELECTOR, "#compare-metrics tr[data-metric=final_val_loss] .is-best"
    )
    assert best.text.endswith("1.2712")
    cheaper = browser.find_element(
        By.CSS_SELECTOR, "#compare-metrics tr[data-metric=cost] .is-best"
    )
    assert cheaper.text.endswith("$0.42")
    # Only the differing hyperparameters show until the box is unticked.
    rows = browser.find_elements(By.CSS_SELECTOR, "#compare-hyperparameters tbody tr")
    visible = [r.text.split()[0] for r in rows if r.is_displayed()]
    assert visible == ["lora_r", "lora_alpha", "learning_rate"]
    csv_link = browser.find_element(By.CSS_SELECTOR, "[data-testid=export-csv]")
    assert "/api/v1/training/compare/csv?jobs=" in csv_link.get_attribute("href")
    active = browser.find_element(By.CSS_SELECTOR, ".nav-link[aria-current=page]")
    assert active.text == "Compare"
    assert _console_errors(browser) == []
    _shoot_full_page(browser, "tools-compare.png")

    # --- Save the better job as a template --------------------------------------------------
    browser.get(f"{live_server.url}/training/{b.pk}/save-template/")
    name = _wait(browser).until(ec.presence_of_element_located((By.ID, "template-name")))
    assert browser.switch_to.active_element == name  # focus starts in the form
    name.clear()
    name.send_keys("Advisor production (r32)")
    browser.find_element(By.ID, "template-description").send_keys(
        "Rank 32 at 3e-4: best validation loss on the advisor data."
    )
    browser.find_element(By.CSS_SELECTOR, "[data-testid=save-template]").click()
    card = _wait(browser).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, ".template-card.is-new"))
    )
    assert "Advisor production (r32)" in card.text
    assert [c.text for c in card.find_elements(By.CSS_SELECTOR, ".chip")] == [
        "learning_rate 3.00e-04",
        "lora_alpha 64",
        "lora_r 32",
    ]
    assert "Saved template" in browser.find_element(By.CSS_SELECTOR, ".messages").text
    template = JobTemplate.objects.get()
    # A second template without a file, to show both kinds of start.
    from training import services

    services.job_template_from_job(
        job=a,
        user=ada,
        name="Balanced starter",
        description="Any dataset, conservative settings.",
        include_training_file=False,
    )
    browser.get(f"{live_server.url}/training/templates/?saved={template.pk}")
    _wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".template-card.is-new")))
    assert len(browser.find_elements(By.CSS_SELECTOR, ".template-card")) == 2
    assert _console_errors(browser) == []
    _shoot_full_page(browser, "tools-templates.png")

    # --- One click: a job from the template -------------------------------------------------
    card = browser.find_element(By.ID, f"template-{template.pk}")
    card.find_element(By.CSS_SELECTOR, "[data-testid=start-template]").click()
    _wait(browser).until(ec.url_matches(r"/training/[0-9a-f-]{36}/$"))
    job = TrainingJob.objects.exclude(pk__in=[a.pk, b.pk]).get()
    assert browser.current_url == f"{live_server.url}/training/{job.pk}/"
    assert job.status == JobStatus.QUEUED
    assert job.configuration == b.configuration and job.created_by == ada
    assert "Started" in browser.find_element(By.CSS_SELECTOR, ".messages").text

    # The template without a file: a small form with the newest ready file preselected.
    starter = JobTemplate.objects.get(name="Balanced starter")
    browser.get(f"{live_server.url}/training/templates/{starter.pk}/start/")
    select = _wait(browser).until(ec.presence_of_element_located((By.ID, "start-file")))
    assert select.get_attribute("value") == str(a.training_file_id)
    _shoot(browser, "tools-template-start.png")

    # --- Playground: base vs adapter --------------------------------------------------------
    _fake_generation(monkeypatch)
    browser.get(f"{live_server.url}/training/playground/?job={b.pk}")
    prompt = _wait(browser).until(ec.presence_of_element_located((By.ID, "prompt")))
    assert "Elena Morales" in browser.find_element(By.ID, "system-prompt").get_attribute("value")
    # An empty prompt: the form comes back in place with the error on the field.
    browser.find_element(By.ID, "run-button").click()
    error = _wait(browser).until(ec.visibility_of_element_located((By.ID, "prompt-error")))
    assert error.text == "Type a prompt."
    assert browser.find_element(By.ID, "prompt").get_attribute("aria-invalid") == "true"
    assert browser.switch_to.active_element.get_attribute("id") == "prompt"  # focus on the fix
    assert len(browser.find_elements(By.TAG_NAME, "h1")) == 1
    _shoot(browser, "tools-playground-invalid.png")
    assert all("400 (Bad Request)" in e for e in _console_errors(browser))  # that answer only
    prompt = browser.find_element(By.ID, "prompt")
    browser.find_element(By.CSS_SELECTOR, "[data-example]").click()
    assert prompt.get_attribute("value") == "How do I save for goal 0?"
    prompt.clear()
    prompt.send_keys("How do I start saving money when my income is irregular?")
    browser.find_element(By.ID, "run-button").click()
    running = _wait(browser).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, "#playground-run[aria-busy=true]"))
    )
    assert running.find_element(By.CSS_SELECTOR, ".spinner").is_displayed()
    _shoot(browser, "tools-playground-running.png")
    answer = _wait(browser).until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, "[data-testid=adapter-output]"))
    )
    assert answer.text.startswith("Start small and make it automatic")
    assert (
        "Saving money is a good idea"
        in browser.find_element(By.CSS_SELECTOR, "[data-testid=base-output]").text
    )
    assert "/training/playground/?job=" in browser.current_url and "run=" in browser.current_url
    assert "greedy" in browser.find_element(By.CSS_SELECTOR, ".run-meta").text
    assert _console_errors(browser) == []
    _shoot_full_page(browser, "tools-playground.png")


def test_empty_and_read_only_states(browser, live_server, ada):  # noqa: F811
    """A viewer: every page says what to do when there is nothing yet, and offers no action."""
    import io

    from config.roles import Role
    from config.services import user_create
    from corpora.services import training_file_create
    from tests.training.conftest import conversations
    from tests.training.test_pages import completed_job
    from training import services
    from training.models import BaseModel, Preset

    user_create(username="vera", role=Role.VIEWER, actor=None, password=PASSWORD)
    _sign_in(browser, live_server, "vera", PASSWORD)
    _wait(browser).until(ec.url_to_be(f"{live_server.url}/"))
    for path, text in [
        ("/training/compare/", "Nothing to compare yet"),
        ("/training/templates/", "No templates yet"),
        ("/training/playground/", "No adapter to try yet"),
    ]:
        browser.get(f"{live_server.url}{path}")
        empty = _wait(browser).until(ec.visibility_of_element_located((By.CSS_SELECTOR, ".empty")))
        assert text in empty.text
    _shoot(browser, "tools-templates-empty.png")

    training_file = training_file_create(
        name="advisor", upload=io.BytesIO(conversations(6)), user=ada
    )
    job = completed_job(
        training_file,
        BaseModel.objects.get(name="SmolLM2-135M-Instruct"),
        Preset.objects.get(key="smoke"),
        user=ada,
    )
    services.job_template_from_job(job=job, user=ada, name="Advisor production")
    browser.get(f"{live_server.url}/training/templates/")
    card = _wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".template-card")))
    assert card.find_elements(By.CSS_SELECTOR, "button, [data-testid=start-template]") == []
    browser.get(f"{live_server.url}/training/playground/")
    _wait(browser).until(ec.presence_of_element_located((By.ID, "playground-job")))
    assert browser.find_elements(By.ID, "playground-form") == []
    assert "Engineers and admins run new prompts" in browser.find_element(By.ID, "content").text
    # One job is not a comparison: the page says what is missing.
    browser.get(f"{live_server.url}/training/compare/?jobs={job.pk}")
    notice = _wait(browser).until(ec.visibility_of_element_located((By.ID, "compare-need-second")))
    assert "Pick a second job" in notice.text
    # The page answers 200 and asks for a second job: no console error at all.
    assert _console_errors(browser) == []
    _shoot(browser, "tools-compare-one-job.png")


def test_playground_says_when_the_server_fails(browser, live_server, ada, monkeypatch):  # noqa: F811
    """A poll that fails with a server error is reported on the page, not swallowed."""
    import io

    from corpora.services import training_file_create
    from tests.training.conftest import conversations
    from tests.training.test_pages import completed_job
    from training import services
    from training.models import BaseModel, Preset

    monkeypatch.setattr("training.tasks.run_playground.delay", lambda run_id: None)
    training_file = training_file_create(
        name="advisor", upload=io.BytesIO(conversations(6)), user=ada
    )
    job = completed_job(
        training_file,
        BaseModel.objects.get(name="SmolLM2-135M-Instruct"),
        Preset.objects.get(key="smoke"),
        user=ada,
    )
    run = services.playground_run_create(job=job, user=ada, prompt="How do I save?")
    _sign_in(browser, live_server, "ada", PASSWORD)
    _wait(browser).until(ec.url_to_be(f"{live_server.url}/"))

    def broken(run):
        raise RuntimeError("database went away")

    browser.get(f"{live_server.url}/training/playground/?job={job.pk}&run={run.pk}")
    _wait(browser).until(ec.presence_of_element_located((By.ID, "playground-run")))
    monkeypatch.setattr("training.views_tools._decorate_run", broken)
    alert = _wait(browser).until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, ".action-error"))
    )
    assert "Something went wrong on our side (HTTP 500)" in alert.text
    card = browser.find_element(By.ID, "playground-run")
    assert "Updates stopped." in card.text and "Reload to check on this run" in card.text
    assert card.get_attribute("aria-busy") == "false"
    _shoot(browser, "tools-playground-server-error.png")
