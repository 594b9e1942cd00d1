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
