"""The chat page in headless Chromium: a streamed answer with its metadata and feedback, two
models side by side, and the seed's states (in flight, retryable error with Retry, rate
limited, authentication required). The offline model's generation is stood in for (the live
server runs in this process) so the states can be produced on purpose. Screenshots go to
var/screenshots/chat-*.png."""

# ruff: noqa: F811  (fixtures imported from test_dashboard_browser are redefined as arguments)

from __future__ import annotations

import time
import uuid

import pytest

from tests.browser.test_dashboard_browser import (  # noqa: F401 (fixtures)
    PASSWORD,
    _console_errors,
    _shoot,
    _sign_in,
    _wait,
    browser,
    driver,
)

try:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select
except ImportError:  # the driver fixture skips
    pass

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def kim(db):
    from config.roles import Role
    from config.services import user_create

    return user_create(username="kim", role=Role.ANALYST, actor=None, password=PASSWORD)


@pytest.fixture
def stand_in(monkeypatch):
    """The offline chat answers from a script: 'slow' waits, 'fail' fails once (a transient
    provider error), anything else answers at once."""
    # the offline models of the data migration (a transactional test flushes them)
    import importlib

    from django.apps import apps

    from jobs.gateway.providers import (
        BaseProvider,
        OfflineProvider,
        ProviderCallError,
        ProviderResponse,
    )
    from jobs.models import GatewaySettings, RegisteredModel

    migration = importlib.import_module("jobs.migrations.0002_offline_provider")
    if not RegisteredModel.objects.filter(key="offline/smollm2-135m-instruct").exists():
        migration.register(apps, None)
    row = GatewaySettings.load()
    row.retry_attempts = 1
    row.save()
    state = {"failed": False}

    def chat(self, model, request, *, timeout, request_id):
        prompt = request["messages"][-1]["content"]
        if "slow" in prompt:
            time.sleep(2.5)
        if "fail" in prompt and not state["failed"]:
            state["failed"] = True
            raise ProviderCallError("the runtime went away", transient=True, reason="connection")
        text = f"{model.remote_id} says: save a little every month, then automate it."
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model.remote_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 31, "completion_tokens": 14, "total_tokens": 45},
        }
        return ProviderResponse(body, 31, 14)

    monkeypatch.setattr(OfflineProvider, "chat", chat)
    # The page streams: the stand-in's answer replayed as chunks (the base provider's way).
    monkeypatch.setattr(OfflineProvider, "chat_stream", BaseProvider.chat_stream)
    monkeypatch.setattr(OfflineProvider, "prompt_tokens", lambda self, model, request: 31)
    return state


@pytest.fixture
def second_model(stand_in):
    from jobs.models import Provider, RegisteredModel

    return RegisteredModel.objects.create(
        provider=Provider.objects.get(slug="offline"),
        remote_id="crucible-advisor",
        key="offline/crucible-advisor",
        display_name="Advisor v3 (adapter)",
        capabilities=["chat"],
        parent="offline/smollm2-135m-instruct",
        adapter_uri="training/jobs/x/adapter",
        price_input_per_m=0,
        price_output_per_m=0,
    )


def _open_chat(browser, live_server) -> None:
    browser.get(f"{live_server.url}/chat/")
    _wait(browser).until(
        lambda b: b.execute_script(
            "return document.getElementById('chat-form').dataset.ready === '1'"
        )
    )


def _send(browser, text: str) -> None:
    browser.execute_script("window.scrollTo(0, 0)")
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()


def _shoot_turn(browser, name: str, pane: str = "a") -> None:
    """A screenshot with the last turn (its state, metadata or error) in view."""
    browser.execute_script(
        "arguments[0].scrollIntoView({block: 'center'})", _last_turn(browser, pane)
    )
    _shoot(browser, name)


def _last_turn(browser, pane: str = "a"):
    return browser.find_elements(By.CSS_SELECTOR, f"#pane-{pane} .turn")[-1]


def _state_is(pane: str, state: str):
    script = (
        f"const t = document.querySelectorAll('#pane-{pane} .turn');"
        f"return t.length && t[t.length - 1].dataset.state === '{state}';"
    )
    return lambda b: b.execute_script(script)


def test_chat_streams_answers_with_metadata_feedback_and_compare(
    browser, live_server, kim, stand_in, second_model
):
    from jobs.models import ChatResponse, Feedback

    _sign_in(browser, live_server, "kim", PASSWORD)
    _wait(browser).until(ec.url_to_be(f"{live_server.url}/"))
    _open_chat(browser, live_server)
    assert browser.find_element(By.TAG_NAME, "h1").text == "Chat"
    active = browser.find_element(By.CSS_SELECTOR, ".nav-link[aria-current=page]")
    assert active.text == "Chat"

    # in flight, then the response with latency, tokens, cost, cache
    _send(browser, "slow: how do I start saving?")
    _wait(browser).until(_state_is("a", "in-flight"))
    turn = _last_turn(browser)
    assert "Generating with offline/smollm2-135m-instruct" in turn.text
    _shoot_turn(browser, "chat-in-flight.png")
    _wait(browser).until(_state_is("a", "done"))
    turn = _last_turn(browser)
    assert "smollm2-135m-instruct says: save a little" in turn.text
    meta = turn.find_element(By.CSS_SELECTOR, ".turn-meta").text
    for part in ("Latency", "Tokens 31 in · 14 out · 45 total", "Cost $0.000000", "Cache miss"):
        assert part in meta, meta
    assert "balanced@v1" in meta
    stored = ChatResponse.objects.get()
    assert stored.source == ChatResponse.Source.COMPLETIONS and stored.profile.name == "balanced"

    # feedback on it
    feedback = turn.find_element(By.CSS_SELECTOR, ".turn-feedback")
    feedback.find_element(By.CSS_SELECTOR, ".thumb[data-thumb='1']").click()
    Select(feedback.find_element(By.CSS_SELECTOR, "select[name=rating]")).select_by_value("5")
    feedback.find_element(By.CSS_SELECTOR, "input[value=helpful]").click()
    feedback.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait(browser).until(
        ec.text_to_be_present_in_element((By.CSS_SELECTOR, ".feedback-state"), "Feedback saved")
    )
    item = Feedback.objects.get()
    assert (item.thumb, item.rating, item.tags) == (1, 5, ["helpful"])
    _shoot_turn(browser, "chat-answer.png")

    # two models side by side
    browser.execute_script("window.scrollTo(0, 0)")
    browser.find_element(By.ID, "compare-toggle").click()
    Select(browser.find_element(By.ID, "model-b")).select_by_value("offline/crucible-advisor")
    _send(browser, "What about an emergency fund?")
    _wait(browser).until(_state_is("a", "done"))
    _wait(browser).until(_state_is("b", "done"))
    assert "crucible-advisor says" in _last_turn(browser, "b").text
    assert "smollm2-135m-instruct says" in _last_turn(browser, "a").text
    panes = browser.find_element(By.ID, "panes")
    assert "is-compare" in panes.get_attribute("class")
    left = browser.find_element(By.ID, "pane-a").rect
    right = browser.find_element(By.ID, "pane-b").rect
    assert abs(left["y"] - right["y"]) < 2 and right["x"] > left["x"] + left["width"] - 1
    _shoot_turn(browser, "chat-compare.png")
    assert _console_errors(browser) == []


def test_chat_error_with_retry_rate_limit_and_sign_in_again(
    browser, live_server, kim, stand_in, settings
):
    _sign_in(browser, live_server, "kim", PASSWORD)
    _wait(browser).until(ec.url_to_be(f"{live_server.url}/"))
    _open_chat(browser, live_server)

    # a retryable error: the message and a Retry button that works
    _send(browser, "fail once please")
    _wait(browser).until(_state_is("a", "error"))
    turn = _last_turn(browser)
    error = turn.find_element(By.CSS_SELECTOR, ".turn-error")
    assert "not reachable" in error.text
    _shoot_turn(browser, "chat-error.png")
    error.find_element(By.CSS_SELECTOR, ".retry").click()
    _wait(browser).until(_state_is("a", "done"))
    assert "says: save a little" in _last_turn(browser).text

    # rate limited: the message with the wait, Retry disabled meanwhile
    settings.API_RATE_LIMIT = "1/m"
    _send(browser, "first under the limit")
    _send(browser, "second, over the limit")
    _wait(browser).until(_state_is("a", "rate-limited"))
    turn = _last_turn(browser)
    assert "Rate limited" in turn.text and "Retry in" in turn.text
    assert not turn.find_element(By.CSS_SELECTOR, ".retry").is_enabled()
    _shoot_turn(browser, "chat-rate-limited.png")
    settings.API_RATE_LIMIT = "600/m"

    # the session ends: authentication required, with a sign-in link
    browser.delete_cookie("sessionid")
    _send(browser, "are you still there?")
    _wait(browser).until(_state_is("a", "auth"))
    turn = _last_turn(browser)
    assert "sign in again" in turn.text
    link = turn.find_element(By.LINK_TEXT, "sign in again")
    assert "/login/?next=/chat/" in link.get_attribute("href")
    _shoot_turn(browser, "chat-auth-required.png")


def test_feedback_page_makes_a_training_file(browser, live_server, kim, stand_in):
    from decimal import Decimal

    from jobs import serving
    from jobs.models import ChatResponse, FeedbackTrainingFile

    for i, (rating, tags, corrected) in enumerate(
        [(5, ["helpful"], ""), (1, ["wrong"], "Keep three months of costs in cash."), (2, [], "")]
    ):
        response = ChatResponse.objects.create(
            source=ChatResponse.Source.PAGE,
            request_id=f"r{i}",
            model_key="offline/smollm2-135m-instruct",
            messages=[{"role": "user", "content": f"Question {i} about saving?"}],
            answer=f"Answer {i}: save something.",
            cost=Decimal(0),
        )
        serving.feedback_create(
            response=response, user=kim, rating=rating, tags=tags, corrected_answer=corrected
        )
    _sign_in(browser, live_server, "kim", PASSWORD)
    _wait(browser).until(ec.url_to_be(f"{live_server.url}/"))
    browser.get(f"{live_server.url}/chat/feedback/")
    per_model = browser.find_element(By.CSS_SELECTOR, "[data-testid=per-model]").text
    assert "offline/smollm2-135m-instruct" in per_model and "2.67" in per_model
    rows = browser.find_elements(By.CSS_SELECTOR, "[data-testid=feedback-rows] tbody tr")
    checked = [r.find_element(By.NAME, "feedback").is_selected() for r in rows]
    assert sorted(checked) == [False, True, True]  # the 2/5 uncorrected one teaches nothing
    _shoot(browser, "chat-feedback.png")
    browser.find_element(By.CSS_SELECTOR, "button[value=file]").click()
    _wait(browser).until(
        ec.text_to_be_present_in_element((By.CSS_SELECTOR, ".messages"), "Training file v1 made")
    )
    lineage = FeedbackTrainingFile.objects.get()
    assert lineage.training_file.conversation_count == 2
    assert "v1" in browser.find_element(By.CSS_SELECTOR, "[data-testid=feedback-files]").text
    _shoot(browser, "chat-feedback-file.png")
