"""Background work of the corpora app: exports."""

from __future__ import annotations

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from corpora import services
from corpora.models import Export


# An export of a large corpus reads and writes every row once per format; it gets more
# than the default ten minutes.
@shared_task(name="corpora.tasks.export_run", soft_time_limit=1800, time_limit=1900)
def export_run_task(export_id: str) -> str | None:
    """Run a queued export (a second delivery finds it claimed and does nothing)."""
    try:
        export = services.export_run(export_id=export_id)
    except SoftTimeLimitExceeded:
        Export.objects.get(pk=export_id).mark_failed("The export ran past its time limit.")
        raise
    return export.status if export else None
