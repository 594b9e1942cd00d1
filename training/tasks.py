"""Celery tasks: thin wrappers that load by ID and call a service.

run_playground goes to the "long" queue (settings.CELERY_TASK_ROUTES); the rest, launches and
the reconcile included, go to "control" and never wait behind long work.
"""

from celery import shared_task

from config.longtasks import recoverer, requeue_overdue
from training import services


@shared_task(name="training.tasks.launch_training_job", acks_late=True)
def launch_training_job(job_id: str) -> str | None:
    job = services.training_job_launch(job_id=job_id)
    return job.status if job else None


@shared_task(name="training.tasks.reconcile_training_jobs", acks_late=True, ignore_result=True)
def reconcile_training_jobs() -> dict:
    return services.training_jobs_reconcile()


PLAYGROUND_SOFT_TIME_LIMIT = 840
PLAYGROUND_TIME_LIMIT = 900


@shared_task(
    name="training.tasks.run_playground",
    acks_late=True,
    ignore_result=True,
    soft_time_limit=PLAYGROUND_SOFT_TIME_LIMIT,
    time_limit=PLAYGROUND_TIME_LIMIT,
)
def run_playground(run_id: str) -> str | None:
    run = services.playground_run_execute(run_id=run_id)
    return run.status if run else None


@recoverer("playground_runs")
def recover_playground_runs() -> list[str]:
    """A playground run still "generating" well after its hard time limit lost its worker:
    enqueue it again (playground_run_execute claims such a run once it is 15 minutes old)."""
    from training.models import PlaygroundRun

    return requeue_overdue(
        PlaygroundRun,
        running=PlaygroundRun.Status.RUNNING,
        pending=PlaygroundRun.Status.QUEUED,
        after_s=services.PLAYGROUND_STALE_AFTER.total_seconds() + 60,
        enqueue=lambda pk: run_playground.delay(pk),
    )


@shared_task(name="training.tasks.retry_training_job_launch", acks_late=True)
def retry_training_job_launch(job_id: str) -> str | None:
    job = services.training_job_launch_retry(job_id=job_id)
    return job.status if job else None


@shared_task(name="training.tasks.release_training_job_pods", acks_late=True, ignore_result=True)
def release_training_job_pods(job_id: str, ended: bool = False) -> list[str]:
    return services.training_job_release_pods(job_id=job_id, ended=ended)


@shared_task(name="training.tasks.sweep_runpod_pods", acks_late=True, ignore_result=True)
def sweep_runpod_pods() -> dict:
    return services.runpod_pods_sweep()
