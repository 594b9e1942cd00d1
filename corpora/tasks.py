"""Background work of the corpora app: exports (on the "long" queue, see CELERY_TASK_ROUTES)."""

from __future__ import annotations

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from config.longtasks import recoverer, requeue_overdue
from corpora import services
from corpora.models import Export

EXPORT_SOFT_TIME_LIMIT = 1800
EXPORT_TIME_LIMIT = 1900


# An export of a large corpus reads and writes every row once per format; it gets more
# than the default ten minutes.
@shared_task(
    name="corpora.tasks.export_run",
    acks_late=True,
    soft_time_limit=EXPORT_SOFT_TIME_LIMIT,
    time_limit=EXPORT_TIME_LIMIT,
)
def export_run_task(export_id: str) -> str | None:
    """Run a queued export (a second delivery finds it claimed and does nothing)."""
    try:
        export = services.export_run(export_id=export_id)
    except SoftTimeLimitExceeded:
        Export.objects.get(pk=export_id).mark_failed("The export ran past its time limit.")
        raise
    return export.status if export else None


@recoverer("exports")
def recover_exports() -> list[str]:
    """An export still "running" after its hard time limit lost its worker (restart, deploy,
    SIGKILL; the filesystem broker never redelivers): queue it again, it starts over."""
    return requeue_overdue(
        Export,
        running=Export.Status.RUNNING,
        pending=Export.Status.QUEUED,
        after_s=EXPORT_TIME_LIMIT + 120,
        enqueue=lambda pk: export_run_task.delay(pk),
    )
