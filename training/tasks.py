"""Celery tasks: thin wrappers that load by ID and call a service."""

from celery import shared_task

from training import services


@shared_task(name="training.tasks.launch_training_job", acks_late=True)
def launch_training_job(job_id: str) -> str | None:
    job = services.training_job_launch(job_id=job_id)
    return job.status if job else None


@shared_task(name="training.tasks.reconcile_training_jobs", acks_late=True, ignore_result=True)
def reconcile_training_jobs() -> dict:
    return services.training_jobs_reconcile()


@shared_task(name="training.tasks.run_playground", acks_late=True, ignore_result=True)
def run_playground(run_id: str) -> str | None:
    run = services.playground_run_execute(run_id=run_id)
    return run.status if run else None
