"""What training announces to the apps above it (billing, evaluation), and what it looks up.

Training is the lower app: it must not import billing or evaluation (the import-linter
contracts in pyproject.toml). It sends these Django signals instead; billing and evaluation
connect their receivers in their ``AppConfig.ready()`` (billing/hooks.py, evaluation/hooks.py).
With no receiver connected, a job simply has no estimate and nothing is charged.

The new-job form and the job page show billing's cost figures the same way: billing
registers a ``Pricing`` (``register_pricing``, from its ready()) and the pages render what it
returns. With none registered, the pages show no costs and only the default GPU type.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from django.dispatch import Signal

# Receivers return the job's estimated cost (Decimal) or None when it cannot be priced.
estimate_requested = Signal()
# Receivers may refuse a start by raising config.errors.Conflict (budget, approval).
start_requested = Signal()
# The reconcile tick: receivers accrue the live cost of running jobs.
reconcile_tick = Signal()
# A job reached completed, failed or cancelled (sent after commit).
job_finished = Signal()
# A job completed (its adapter exists): evaluation starts the automatic validation.
job_completed = Signal()


def estimate_for_job(*, job) -> Decimal | None:
    for _receiver, value in estimate_requested.send(sender=job.__class__, job=job):
        if value is not None:
            return value
    return None


def before_start(*, job, user, override_reason: str = "") -> None:
    start_requested.send(sender=job.__class__, job=job, user=user, override_reason=override_reason)


def accrue(*, now: datetime) -> None:
    reconcile_tick.send(sender=None, now=now)


def announce_job_finished(*, job) -> None:
    job_finished.send(sender=job.__class__, job=job)


def announce_job_completed(*, job) -> None:
    job_completed.send(sender=job.__class__, job=job)


# --- Cost figures on training's pages (billing lends them) ---------------------------------------


class Pricing(Protocol):
    """Billing's figures for the new-job form and the job page (billing/hooks.py)."""

    def gpu_types(self) -> Any:
        """The GPU types a RunPod job may choose: a queryset of price rows (``.gpu_type`` the
        key, ``str()`` the label)."""

    def estimate(
        self,
        *,
        training_file,
        base_model,
        preset=None,
        overrides: dict | None = None,
        gpu_type: str = "",
        spot: bool = False,
        executor: str = "runpod",
    ) -> Any:
        """The duration and cost estimate of a configuration (raises a CrucibleError when it
        cannot be estimated)."""

    def job_cost(self, *, job_id) -> dict:
        """A job's cost so far against its estimate (raises a CrucibleError for no job)."""

    def money_text(self, low: float, high: float) -> str:
        """A cost range as text, e.g. "$1.20-1.80"."""

    def range_text(self, low_s: float, high_s: float) -> str:
        """A duration range in seconds as text, e.g. "12-15 hours"."""


_pricing: Pricing | None = None


def register_pricing(pricing: Pricing | None) -> None:
    """Lend training's pages these cost figures (billing, from BillingConfig.ready())."""
    global _pricing
    _pricing = pricing


def pricing() -> Pricing | None:
    """The registered cost figures, or None (the pages then show no costs)."""
    return _pricing
