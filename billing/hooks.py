"""How billing answers training (training/hooks.py announces; connect() subscribes these and
lends training's pages billing's cost figures through ``Pricing``)."""

from __future__ import annotations

import logging
from datetime import datetime
from decimal import Decimal

from django.db import transaction

from config.errors import CrucibleError

logger = logging.getLogger("crucible.billing")


def estimate_for_job(*, job) -> Decimal | None:
    """Estimated cost of ``job`` before it starts (stored on job.cost_estimate).

    None when it cannot be priced (a GPU type missing from the catalog); starting such a
    job is then refused with the reason.
    """
    from billing.services import job_cost_record

    try:
        return job_cost_record(job=job).estimate_cost
    except CrucibleError as exc:
        logger.warning("no estimate for job %s: %s", job.pk, exc.message)
        return None


def before_start(*, job, user, override_reason: str = "") -> None:
    """Refuse a start over budget or needing approval (config.errors.Conflict); else
    reserve the job's estimated cost."""
    from billing.services import job_start_check

    job_start_check(job=job, user=user, override_reason=override_reason)


def accrue(*, now: datetime) -> None:
    """Accrue live cost of running jobs; alerts; stop jobs at the hard cap."""
    from billing.services import costs_accrue

    try:
        costs_accrue(now=now)
    except Exception:  # billing must never stop reconcile from recovering jobs
        logger.exception("cost accrual failed")


def job_finished(*, job) -> None:
    """A job reached completed, failed or cancelled: final cost, then notifications."""
    from billing.services import job_finalize
    from billing.tasks import notify_job_finished

    try:
        job_finalize(job=job)
    except Exception:
        logger.exception("final cost of job %s failed", job.pk)
    job_id = str(job.pk)

    def enqueue() -> None:
        try:
            notify_job_finished.delay(job_id)
        except Exception:
            logger.exception("could not queue the notification of job %s", job_id)

    transaction.on_commit(enqueue)


class Pricing:
    """Billing's cost figures on training's new-job form and job page (training/hooks.py's
    ``Pricing``: training renders what these return and never imports billing)."""

    @staticmethod
    def gpu_types():
        from billing.models import GpuPrice

        return GpuPrice.objects.filter(is_active=True).exclude(gpu_type__startswith="cpu")

    @staticmethod
    def estimate(**configuration):
        from billing.services import cost_estimate

        return cost_estimate(**configuration)

    @staticmethod
    def job_cost(*, job_id) -> dict:
        from billing.services import job_cost_detail

        return job_cost_detail(job_id=job_id)

    @staticmethod
    def money_text(low: float, high: float) -> str:
        from billing.estimates import money_text

        return money_text(low, high)

    @staticmethod
    def range_text(low_s: float, high_s: float) -> str:
        from billing.estimates import range_text

        return range_text(low_s, high_s)


def connect() -> None:
    """Subscribe to training's announcements and lend its pages the cost figures
    (training/hooks.py), and keep the month's LLM spend counter honest about ledger rows
    written around billing's services; called by BillingConfig.ready()."""
    from django.db.models.signals import post_delete, post_save

    from billing.models import LlmCall
    from billing.services import llm_ledger_changed
    from training import hooks as training

    post_save.connect(
        lambda sender, instance, **kw: llm_ledger_changed(call=instance),
        sender=LlmCall,
        weak=False,
        dispatch_uid="billing-llm-saved",
    )
    post_delete.connect(
        lambda sender, instance, **kw: llm_ledger_changed(call=instance, deleted=True),
        sender=LlmCall,
        weak=False,
        dispatch_uid="billing-llm-deleted",
    )

    training.register_pricing(Pricing())

    training.estimate_requested.connect(
        lambda sender, job, **kw: estimate_for_job(job=job), weak=False, dispatch_uid="billing-est"
    )
    training.start_requested.connect(
        lambda sender, job, user, override_reason="", **kw: before_start(
            job=job, user=user, override_reason=override_reason
        ),
        weak=False,
        dispatch_uid="billing-start",
    )
    training.reconcile_tick.connect(
        lambda sender, now, **kw: accrue(now=now), weak=False, dispatch_uid="billing-accrue"
    )
    training.job_finished.connect(
        lambda sender, job, **kw: job_finished(job=job), weak=False, dispatch_uid="billing-done"
    )
