"""Background work of billing (tasks take IDs)."""

from __future__ import annotations

from celery import shared_task


@shared_task(name="billing.tasks.notify_job_finished")
def notify_job_finished(job_id: str) -> dict:
    from billing.notifications import job_finished_notify
    from training.models import TrainingJob

    job = TrainingJob.objects.select_related("created_by", "billing").filter(pk=job_id).first()
    if job is None:
        return {}
    return job_finished_notify(job=job)


@shared_task(name="billing.tasks.refresh_gpu_prices")
def refresh_gpu_prices() -> int:
    from billing.services import gpu_prices_refresh

    return gpu_prices_refresh()


@shared_task(name="billing.tasks.accrue_costs")
def accrue_costs() -> dict:
    """Accrual on its own (reconcile also calls it every 20 s)."""
    from billing.services import costs_accrue

    return costs_accrue()
