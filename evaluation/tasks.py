"""Celery tasks: thin wrappers that load by ID and call a service.

execute_validation_run goes to the "long" queue (settings.CELERY_TASK_ROUTES) with its own,
larger time limits; the rest go to "control".
"""

from celery import shared_task
from django.conf import settings

from config.longtasks import recoverer
from evaluation import services
from evaluation.models import ValidationRun


@shared_task(
    name="evaluation.tasks.execute_validation_run",
    acks_late=True,
    soft_time_limit=settings.EVALUATION_TASK_TIME_LIMIT,
    time_limit=settings.EVALUATION_TASK_TIME_LIMIT + 60,
)
def execute_validation_run(run_id: str) -> str | None:
    run = services.validation_run_execute(run_id=run_id, keepalive=True)
    return run.status if run else None


@shared_task(name="evaluation.tasks.recompute_validation_metrics", acks_late=True)
def recompute_validation_metrics(run_id: str) -> bool:
    run = ValidationRun.objects.select_related("job").filter(pk=run_id).first()
    if run is None or run.status != "completed":
        return False
    services.validation_metrics_recompute(run=run)
    return True


@recoverer("validation_runs")
def recover_validation_runs() -> dict:
    """Part of config.tasks.reconcile_long_tasks (beat, every minute)."""
    return services.validation_runs_recover()
