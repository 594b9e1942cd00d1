"""The app boundaries of pyproject.toml's [tool.importlinter] contracts hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Contracts: 3 kept, 0 broken." in output


def test_training_announces_instead_of_importing_billing_and_evaluation():
    from training import hooks

    # billing and evaluation subscribed in their AppConfig.ready()
    assert hooks.estimate_requested.has_listeners()
    assert hooks.start_requested.has_listeners()
    assert hooks.reconcile_tick.has_listeners()
    assert hooks.job_finished.has_listeners()
    assert hooks.job_completed.has_listeners()


@pytest.mark.django_db
def test_billing_lends_training_its_cost_figures():
    from billing import estimates
    from billing.models import GpuPrice
    from training import hooks

    pricing = hooks.pricing()  # registered by BillingConfig.ready()
    assert pricing is not None
    offered = list(pricing.gpu_types())
    assert offered and all(isinstance(p, GpuPrice) and p.is_active for p in offered)
    assert not any(p.gpu_type.startswith("cpu") for p in offered)
    assert pricing.money_text(1.2, 1.8) == estimates.money_text(1.2, 1.8)
    assert pricing.range_text(600, 900) == estimates.range_text(600, 900)


@pytest.mark.django_db
def test_jobs_fills_the_llm_port_that_training_and_corpora_call():
    from config import llm
    from jobs import gateway

    assert llm.registered() and llm.error_type() is gateway.GatewayError
    chat_keys = list(gateway.models(capability="chat").values_list("key", flat=True))
    assert chat_keys and llm.model_keys(capability="chat") == chat_keys
    assert isinstance(llm.caller(feature="rag"), gateway.Caller)
    # The gateway's own errors come through, under the base class the port names.
    hello = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    with pytest.raises(llm.error_type()) as refused:
        llm.chat(model="offline/no-such-model", request=hello)
    assert isinstance(refused.value, gateway.UnknownModel)


def test_without_a_gateway_the_llm_port_refuses_with_a_503(monkeypatch):
    from config import llm

    monkeypatch.setattr(llm, "_gateway", None)
    with pytest.raises(llm.LLMUnavailable) as refused:
        llm.embed(model="offline/all-minilm-l6-v2", input=["hello"])
    assert refused.value.status_code == 503 and not llm.registered()
    assert issubclass(llm.error_type(), Exception)


def test_the_rag_routes_are_on_the_public_api():
    from django.urls import resolve

    # Mounted by JobsConfig.ready() (jobs -> corpora; corpora never imports jobs).
    assert resolve("/v1/rag/indexes").route == "v1/rag/indexes"
