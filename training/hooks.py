"""What training announces to the apps above it (billing, evaluation).

Training is the lower app: it must not import billing or evaluation (the import-linter
contracts in pyproject.toml). It sends these Django signals instead; billing and evaluation
connect their receivers in their ``AppConfig.ready()`` (billing/hooks.py, evaluation/hooks.py).
With no receiver connected, a job simply has no estimate and nothing is charged.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

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
