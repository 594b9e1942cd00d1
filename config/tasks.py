"""Periodic platform tasks (scheduled in settings.CELERY_BEAT_SCHEDULE)."""

from __future__ import annotations

from celery import shared_task
from django.core.cache import cache
from django.utils import timezone

WORKER_HEARTBEAT_KEY = "crucible:worker-heartbeat"


@shared_task(name="config.tasks.worker_heartbeat", ignore_result=True)
def worker_heartbeat() -> None:
    """Beat sends it every minute and a worker runs it: a fresh value means both are up."""
    cache.set(WORKER_HEARTBEAT_KEY, timezone.now().isoformat(), timeout=3600)


def last_worker_heartbeat():
    value = cache.get(WORKER_HEARTBEAT_KEY)
    return timezone.datetime.fromisoformat(value) if value else None


@shared_task(name="config.tasks.reconcile_long_tasks", ignore_result=True)
def reconcile_long_tasks() -> dict:
    """Beat sends it every minute (control queue): long tasks whose worker died are restarted
    (the steps are registered by the apps' tasks modules, see config/longtasks.py)."""
    from config.longtasks import reconcile_all

    return reconcile_all()
