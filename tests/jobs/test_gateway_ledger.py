"""The ledger's write-ahead row: a call about to reach the provider is in the ledger (outcome
``in_flight``) before the request leaves, so a process killed during the call (simulated here by
skipping the gateway's final step, as a SIGKILL would) leaves a row that recovery settles, from
the response cache when the answer got there, else at the held worst case. Every call that
reached the provider is in the ledger exactly once."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from billing import services as billing
from billing.models import LlmCall, LlmReservation
from jobs import gateway
from jobs.gateway import client
from tests.factories import UserFactory

pytest_plugins = ["tests.jobs.openai_server"]
pytestmark = pytest.mark.django_db

BODY = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16, "seed": 3}


@pytest.fixture
def on_send(monkeypatch):
    """Runs a function in the calling thread just before each request leaves for the provider
    (the server runs in another thread, which does not see the test's transaction)."""
    hooks = []
    provider_for = client.provider_for

    class Spy:
        def __init__(self, adapter):
            self._adapter = adapter

        def __getattr__(self, name):
            return getattr(self._adapter, name)

        def chat(self, *args, **kwargs):
            for hook in hooks:
                hook()
            return self._adapter.chat(*args, **kwargs)

    monkeypatch.setattr(client, "provider_for", lambda provider: Spy(provider_for(provider)))
    return hooks.append


@pytest.fixture
def killed_after_call(monkeypatch):
    """The process dies right after the provider answered: the gateway's last step (the
    ledger settlement) never runs."""
    monkeypatch.setattr(client, "_end", lambda state: None)


def test_row_is_written_before_the_request_leaves(
    loopback_model, openai_server, fast_gateway, on_send
):
    seen = []
    on_send(
        lambda: seen.append(
            [(c.outcome, c.attempts, c.cached) for c in LlmCall.objects.all()]
            + [LlmReservation.objects.count()]
        )
    )
    result = gateway.chat(model=loopback_model.key, request=BODY, interactive=False)
    assert seen == [[("in_flight", 1, False), 1]]
    call = LlmCall.objects.get()  # completed in place, not a second row
    assert call.pk == result.meta.ledger_id
    assert (call.outcome, call.attempts, call.cost) == ("ok", 1, Decimal("0.000013"))
    assert not LlmReservation.objects.exists()


def test_retries_are_counted_before_they_leave(
    loopback_model, openai_server, fast_gateway, on_send
):
    openai_server.fail(500).fail(429, headers={"Retry-After": "0"})
    seen = []
    on_send(lambda: seen.append(LlmCall.objects.get().attempts))
    gateway.chat(model=loopback_model.key, request=BODY, interactive=False)
    assert seen == [1, 2, 3]  # each try was in the ledger when it left
    call = LlmCall.objects.get()
    assert (call.attempts, call.outcome) == (3, "ok")
    assert call.attempts == len(openai_server.calls())


def test_killed_after_the_answer_was_cached_settles_as_answered_and_rerun_is_a_hit(
    loopback_model, openai_server, fast_gateway, killed_after_call
):
    user = UserFactory()
    caller = gateway.Caller(user=user, feature="batch", subject=user)
    gateway.chat(model=loopback_model.key, request=BODY, caller=caller, interactive=False)
    call = LlmCall.objects.get()
    reservation = LlmReservation.objects.get()
    assert (call.outcome, call.attempts, call.cached, call.subject) == ("in_flight", 1, False, user)
    assert reservation.call_id == call.pk and reservation.amount > 0
    # The worker is known dead (its task was reclaimed): recovery settles its calls.
    assert gateway.calls_recover(subject_type=type(user), subject_ids=[user.pk]) == 1
    call.refresh_from_db()
    assert (call.outcome, call.prompt_tokens, call.completion_tokens) == ("ok", 3, 5)
    assert call.cost == Decimal("0.000013")  # the exact cost, not the worst case held
    assert not LlmReservation.objects.exists()
    assert gateway.calls_recover(subject_type=type(user), subject_ids=[user.pk]) == 0


def test_rerun_after_kill_is_a_cache_hit(loopback_model, openai_server, fast_gateway, monkeypatch):
    end = client._end
    monkeypatch.setattr(client, "_end", lambda state: None)
    gateway.chat(model=loopback_model.key, request=BODY, interactive=False)
    monkeypatch.setattr(client, "_end", end)
    gateway.calls_recover(now=timezone.now() + timedelta(hours=1))
    again = gateway.chat(model=loopback_model.key, request=BODY, interactive=False)
    assert again.meta.cached
    rows = list(LlmCall.objects.order_by("created_at", "id").values_list("cached", "outcome"))
    assert rows == [(False, "ok"), (True, "ok")]
    assert (
        len(openai_server.calls())
        == 1
        == sum(LlmCall.objects.filter(cached=False).values_list("attempts", flat=True))
    )


def test_killed_before_the_answer_settles_lost_at_the_worst_case(
    loopback_model, openai_server, fast_gateway, killed_after_call
):
    # no-store: the answer never reaches the cache, as when the kill comes mid-request.
    gateway.chat(model=loopback_model.key, request=BODY, interactive=False, cache="no-store")
    held = LlmReservation.objects.get().amount
    assert held > 0
    # Not expired yet: the beat's expiry leaves it (its process may still be working).
    assert billing.llm_reservations_expire() == 0
    assert LlmCall.objects.get().outcome == "in_flight"
    # Past its expiry the beat settles it (billing's costs_accrue runs this every minute).
    assert billing.llm_reservations_expire(now=timezone.now() + timedelta(hours=1)) == 1
    call = LlmCall.objects.get()
    assert (call.outcome, call.attempts, call.cost) == ("error:worker_lost", 1, held)
    assert not LlmReservation.objects.exists()
    assert billing.llm_month_spent(month=call.month) == held  # counted once, not lost


def test_a_slow_process_settling_after_recovery_keeps_one_row(
    loopback_model, openai_server, fast_gateway, on_send
):
    """Recovery took the process for dead while it was only slow: its own settlement comes
    later and completes the same row (one row, its real figures)."""
    on_send(lambda: billing.llm_orphan_settle(reservation=LlmReservation.objects.get()))
    result = gateway.chat(model=loopback_model.key, request=BODY, interactive=False)
    call = LlmCall.objects.get()
    assert call.pk == result.meta.ledger_id
    assert (call.outcome, call.cost) == ("ok", Decimal("0.000013"))
    assert not LlmReservation.objects.exists()


def test_unpriced_calls_write_ahead_too(loopback_model, openai_server, fast_gateway, on_send):
    loopback_model.price_input_per_m = None
    loopback_model.price_output_per_m = None
    loopback_model.allow_unpriced = True
    loopback_model.save()
    seen = []
    on_send(lambda: seen.append(LlmCall.objects.get().outcome))
    gateway.chat(model=loopback_model.key, request=BODY, interactive=False)
    assert seen == ["in_flight"]
    call = LlmCall.objects.get()
    assert (call.outcome, call.cost) == ("ok", 0) and not LlmReservation.objects.exists()
