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


# --- RAG knowledge bases ----------------------------------------------------------------------

KB_SOFT_TIME_LIMIT = 3600
KB_TIME_LIMIT = 3700


@shared_task(
    name="corpora.tasks.knowledge_base_build",
    acks_late=True,
    soft_time_limit=KB_SOFT_TIME_LIMIT,
    time_limit=KB_TIME_LIMIT,
)
def knowledge_base_build_task(kb_id: str) -> str | None:
    """Build or update a knowledge base (a second delivery finds it claimed: nothing)."""
    from corpora.rag.services import knowledge_base_refresh

    kb = knowledge_base_refresh(kb_id=kb_id)
    return kb.status if kb else None


@recoverer("knowledge_bases")
def recover_knowledge_bases() -> dict:
    """A build whose worker stopped heartbeating is released and enqueued again (its claim is
    cleared, so the next delivery claims it afresh); after LONG_TASK_MAX_ATTEMPTS it fails."""
    from django.conf import settings
    from django.utils import timezone

    from config.longtasks import stale_cutoff, stale_q
    from corpora.models import KnowledgeBase

    working = [KnowledgeBase.Status.BUILDING, KnowledgeBase.Status.UPDATING]
    cutoff = stale_cutoff()
    requeued, failed = [], []
    stale = KnowledgeBase.objects.filter(stale_q(cutoff), status__in=working).exclude(claimed_by="")
    for pk, attempts, version in stale.values_list("pk", "attempts", "version"):
        mine = KnowledgeBase.objects.filter(stale_q(cutoff), pk=pk, status__in=working).exclude(
            claimed_by=""
        )
        if attempts >= settings.LONG_TASK_MAX_ATTEMPTS:
            status = KnowledgeBase.Status.READY if version else KnowledgeBase.Status.FAILED
            if mine.update(status=status, claimed_by="", error="Its worker stopped repeatedly."):
                failed.append(str(pk))
            continue
        if mine.update(claimed_by="", heartbeat_at=timezone.now()):
            requeued.append(str(pk))
            knowledge_base_build_task.delay(str(pk))
    return {"requeued": requeued, "failed": failed}
