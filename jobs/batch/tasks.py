"""Celery tasks of batch jobs: they take ids and call the services. The dispatcher and the
reconcile run on the control queue; the model calls on the long queue."""

from __future__ import annotations

from celery import shared_task

from config.longtasks import recoverer
from jobs.batch import services


@shared_task(name="jobs.batch.tasks.batch_dispatch", acks_late=True, ignore_result=True)
def batch_dispatch(job_id: str) -> dict:
    """Top up every model's window of a running job."""
    out = services.job_dispatch(job_id=job_id)
    services.job_finish_if_done(job_id)
    return out


@shared_task(
    name="jobs.batch.tasks.batch_run_task",
    acks_late=True,
    ignore_result=True,
    soft_time_limit=900,
    time_limit=960,
)
def batch_run_task(task_id: str) -> str | None:
    """Claim and run one batch task (a no-op when it is not queued any more); dispatch now
    sends windows (``batch_run_window``): this one serves messages sent before."""
    return services.task_run(task_id=task_id)


@shared_task(
    name="jobs.batch.tasks.batch_run_window",
    queue="long",
    acks_late=True,
    ignore_result=True,
    soft_time_limit=1800,
    time_limit=1860,
)
def batch_run_window(job_id: str, task_ids: list[str]) -> dict:
    """Claim and run a window of one model's queued tasks (each claimed atomically as it
    starts; one already claimed or finished elsewhere is skipped), a few at a time, then top
    up the job's dispatch."""
    return services.tasks_run_window(job_id=job_id, task_ids=task_ids)


@shared_task(name="jobs.batch.tasks.batch_stats", acks_late=True, ignore_result=True)
def batch_stats(job_id: str, final: bool = False) -> int:
    """Recompute a job's statistics (partial while it runs)."""
    from jobs.batch.results import stats_refresh

    snapshot = stats_refresh(job_id=job_id, force=True)
    return snapshot.tasks_done if snapshot else 0


@recoverer("batch_tasks")
def _reconcile_batch() -> dict:
    # config.tasks.reconcile_long_tasks (beat, every minute) calls every registered step.
    return services.batch_reconcile()
