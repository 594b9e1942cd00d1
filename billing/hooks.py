"""How training calls into billing. The billing issue fills these in; until then they
only keep the interface (no estimate, no budget check, nothing accrued)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal


def estimate_for_job(*, job) -> Decimal | None:
    """Estimated cost of ``job`` before it starts (stored on job.cost_estimate)."""
    return None


def before_start(*, job, user, override_reason: str = "") -> None:
    """Raise config.errors.Conflict to refuse a start (over budget, needs approval)."""


def accrue(*, now: datetime) -> None:
    """Accrue live cost of running jobs; stop jobs at the hard cap (called by reconcile)."""


def job_finished(*, job) -> None:
    """A job reached completed, failed or cancelled (notifications, final cost)."""
