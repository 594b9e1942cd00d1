"""LLM calls held to the monthly budget: reservations, settlement, release, expiry, the
refusal the training side uses, month spend and the per-model/per-feature summary; fifty
parallel gateway calls near the budget never overspend and leave no reservation open."""

import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone

from billing import services
from billing.models import LlmCall, LlmReservation
from config.errors import Conflict
from jobs import gateway

pytest_plugins = ["tests.jobs.openai_server"]

BODY = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}


def _priced(model, per_m: int = 10_000):
    """$0.01 a token in and out: the worst case of BODY is 11 + 5 tokens = $0.16, the real
    cost (3 + 3 tokens on the loopback server) $0.06."""
    model.price_input_per_m = model.price_output_per_m = Decimal(per_m)
    model.save()
    return model


@pytest.mark.django_db
def test_reserve_refuses_with_the_training_budget_error():
    services.budget_set(user=None, amount=Decimal("1.00"))
    held = services.llm_budget_reserve(amount=Decimal("0.70"), model="m", feature="judge")
    with pytest.raises(services.BudgetExceeded) as caught:
        services.llm_budget_reserve(amount=Decimal("0.40"), model="m")
    error = caught.value
    assert isinstance(error, Conflict)
    assert (error.code, error.status_code) == ("budget_exceeded", 409)
    assert error.details["reserved"] == Decimal("0.70")
    assert error.details["remaining"] == Decimal("0.30")
    assert "over its budget" in error.message
    services.llm_budget_release(reservation=held)
    assert services.llm_budget_reserve(amount=Decimal("0.40"), model="m")


@pytest.mark.django_db
def test_settle_turns_the_reservation_into_spend():
    services.budget_set(user=None, amount=Decimal("1.00"))
    held = services.llm_budget_reserve(amount=Decimal("0.50"), model="m")
    call = services.llm_call_record(
        reservation=held, feature="judge", provider="p", model="m", cost=Decimal("0.123456789")
    )
    assert not LlmReservation.objects.exists()
    assert call.cost == Decimal("0.12345679")
    month = services.month_start()
    assert services.month_spent(month=month) == Decimal("0.12")
    summary = services.budget_summary(month=month)
    assert summary["spent"] == Decimal("0.12")
    assert summary["by_kind"]["llm_calls"] == Decimal("0.12")
    assert summary["daily"][-1]["cumulative"] == Decimal("0.12")


@pytest.mark.django_db
def test_stale_reservations_do_not_count_and_expire():
    services.budget_set(user=None, amount=Decimal("1.00"))
    LlmReservation.objects.create(
        month=services.month_start(),
        amount=Decimal("0.90"),
        model="m",
        expires_at=timezone.now() - timedelta(seconds=1),
    )
    assert services.llm_reserved(month=services.month_start()) == 0
    assert services.llm_budget_reserve(amount=Decimal("0.50"), model="m")
    assert services.llm_reservations_expire() == 1
    assert LlmReservation.objects.count() == 1


@pytest.mark.django_db
def test_gateway_refuses_over_budget_and_writes_the_refusal(
    loopback_model, openai_server, fast_gateway
):
    _priced(loopback_model)
    services.budget_set(user=None, amount=Decimal("0.10"))
    with pytest.raises(gateway.BudgetExceeded) as caught:
        gateway.chat(model=loopback_model.key, request=BODY)
    error = caught.value
    assert isinstance(error, services.BudgetExceeded) and isinstance(error, gateway.GatewayError)
    assert (error.code, error.status_code) == ("budget_exceeded", 409)
    assert error.details["estimate"] == Decimal("0.16")
    assert openai_server.calls() == []
    call = LlmCall.objects.get()
    assert (call.outcome, call.cost, call.attempts) == ("error:budget_exceeded", 0, 0)
    assert not LlmReservation.objects.exists()


@pytest.mark.django_db
def test_failed_call_releases_its_reservation(loopback_model, openai_server, fast_gateway):
    _priced(loopback_model)
    services.budget_set(user=None, amount=Decimal("1.00"))
    openai_server.fail(400)
    with pytest.raises(gateway.ProviderError):
        gateway.chat(model=loopback_model.key, request=BODY)
    assert not LlmReservation.objects.exists()
    assert services.month_spent(month=services.month_start()) == 0
    result = gateway.chat(model=loopback_model.key, request=BODY)
    assert result.meta.cost == Decimal("0.06")
    assert services.month_spent(month=services.month_start()) == Decimal("0.06")


@pytest.mark.django_db
def test_llm_spend_summary_per_model_and_feature(loopback_model, openai_server, fast_gateway):
    _priced(loopback_model)
    services.budget_set(user=None, amount=Decimal("5.00"))
    gateway.chat(model=loopback_model.key, request=BODY, caller=gateway.Caller(feature="judge"))
    gateway.chat(model=loopback_model.key, request=BODY, caller=gateway.Caller(feature="judge"))
    gateway.chat(
        model=loopback_model.key,
        request={**BODY, "seed": 1},
        caller=gateway.Caller(feature="playground"),
    )
    summary = services.llm_spend_summary()
    assert summary["calls"] == 3 and summary["cached"] == 1
    # The seed makes the loopback answer two words longer: 3 + 5 tokens = $0.08.
    assert summary["cost"] == Decimal("0.140000")
    assert [(r["model"], r["calls"], r["cost"]) for r in summary["by_model"]] == [
        (loopback_model.key, 3, Decimal("0.140000"))
    ]
    by_feature = {r["feature"]: (r["calls"], r["cached"], r["cost"]) for r in summary["by_feature"]}
    assert by_feature == {
        "judge": (2, 1, Decimal("0.060000")),
        "playground": (1, 0, Decimal("0.080000")),
    }


@pytest.mark.django_db(transaction=True)
def test_fifty_parallel_calls_never_overspend(loopback_model, openai_server, fast_gateway):
    _priced(loopback_model)
    budget = Decimal("1.00")
    services.budget_set(user=None, amount=budget)
    outcomes: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(50)

    def call(i: int) -> None:
        try:
            start.wait()
            gateway.chat(
                model=loopback_model.key,
                request={**BODY, "seed": i},  # distinct: no cache hits
                caller=gateway.Caller(feature="batch"),
                interactive=False,
            )
            outcome = "ok"
        except gateway.BudgetExceeded:
            outcome = "refused"
        except Exception as exc:  # reported by the assertion below
            outcome = repr(exc)
        finally:
            connection.close()
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(outcomes) == 50
    assert set(outcomes) <= {"ok", "refused"}, outcomes
    ok = outcomes.count("ok")
    spent = services.month_spent(month=services.month_start())
    assert spent <= budget
    # Each call reserves $0.16 and costs $0.08 (3 + 5 tokens): at least 6 fit at once, and
    # at most 11 in all (the 11th is admitted at $0.80 spent + $0.16).
    assert 6 <= ok <= 11
    assert outcomes.count("refused") == 50 - ok
    assert spent == Decimal("0.08") * ok
    assert not LlmReservation.objects.exists()
    assert LlmCall.objects.count() == 50
    assert LlmCall.objects.filter(outcome="error:budget_exceeded").count() == 50 - ok
    assert len(openai_server.calls()) == ok


def _counter() -> int | None:
    from billing.models import MonthlyBudget

    return MonthlyBudget.objects.get(month=services.month_start()).llm_spent_e8


def _ledger_e8() -> int:
    return sum(int(c * services.E8) for c in LlmCall.objects.values_list("cost", flat=True))


@pytest.mark.django_db
def test_the_spend_counter_follows_the_ledger_exactly(loopback_model, openai_server, fast_gateway):
    """The month's running gateway spend equals the ledger's SUM after calls, failures and a
    cache hit; a ledger row written outside billing forgets it, and the next reservation sums
    it again; saving the budget (the page, the admin) never writes back a stale counter."""
    from billing.models import MonthlyBudget

    _priced(loopback_model)
    services.budget_set(user=None, amount=Decimal("5.00"))
    gateway.chat(model=loopback_model.key, request=BODY)
    gateway.chat(model=loopback_model.key, request=BODY)  # a cache hit: no cost
    openai_server.fail(400)
    with pytest.raises(gateway.ProviderError):
        gateway.chat(model=loopback_model.key, request={**BODY, "seed": 2})
    gateway.chat(model=loopback_model.key, request={**BODY, "seed": 3})
    assert _counter() == _ledger_e8() == int(Decimal("0.14") * services.E8)

    stale = MonthlyBudget.objects.get(month=services.month_start())
    gateway.chat(model=loopback_model.key, request={**BODY, "seed": 4})
    stale.amount = Decimal("6.00")
    stale.save()  # the page's save: every field but the counter
    assert _counter() == _ledger_e8() == int(Decimal("0.22") * services.E8)

    # A row written around billing (the admin, a data fix): forgotten, then summed again.
    LlmCall.objects.create(
        month=services.month_start(),
        day=timezone.localdate(),
        model="m",
        provider="p",
        cost=Decimal("0.12345678"),
    )
    assert _counter() is None
    services.llm_budget_release(
        reservation=services.llm_budget_reserve(amount=Decimal("0.01"), model="m")
    )
    assert _counter() == _ledger_e8() == int(Decimal("0.34345678") * services.E8)
    assert services.month_spent(month=services.month_start()) == Decimal("0.34")


@pytest.mark.django_db
def test_the_counter_refuses_at_the_same_point_as_the_ledger():
    """A reservation decides on the counter: spend recorded through billing counts at once."""
    services.budget_set(user=None, amount=Decimal("1.00"))
    held = services.llm_budget_reserve(amount=Decimal("0.90"), model="m")
    services.llm_call_record(
        reservation=held, feature="judge", provider="p", model="m", cost=Decimal("0.85")
    )
    services.llm_call_record(
        reservation=None, feature="judge", provider="p", model="m", cost=Decimal("0.10")
    )
    assert _counter() == _ledger_e8() == int(Decimal("0.95") * services.E8)
    with pytest.raises(services.BudgetExceeded) as caught:
        services.llm_budget_reserve(amount=Decimal("0.06"), model="m")
    assert caught.value.details["spent"] == Decimal("0.95")
    assert services.llm_budget_reserve(amount=Decimal("0.05"), model="m")
