"""Backpressure for batch submissions: while the queue that batch work runs on holds
``BATCH_QUEUE_LIMIT`` messages, new batch jobs and batch evaluations are refused with 503
``queue_full`` and ``Retry-After`` instead of growing the queue (docs/runbook.md). Interactive
chat never waits on these queues: it has its own web workers."""

from __future__ import annotations

import logging
import os

from django.conf import settings

from config.errors import QueueFull

logger = logging.getLogger("crucible.backpressure")


def queue_depth(queue: str) -> int | None:
    """Messages waiting on a Celery queue: LLEN on Redis; on the filesystem broker, the
    message files in its queue folder whose routing key is ``queue``. None when unknown."""
    broker = str(getattr(settings, "CELERY_BROKER_URL", ""))
    try:
        if broker.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(broker, socket_timeout=0.5, socket_connect_timeout=0.5)
            return int(client.llen(queue))
        folder = settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("data_folder_in")
        if not folder or not os.path.isdir(folder):
            return None
        return sum(1 for name in os.listdir(folder) if name.endswith(f".{queue}.msg"))
    except Exception:
        logger.warning("queue depth of %s unreadable", queue, exc_info=True)
        return None


def queue_limit() -> int:
    return int(settings.BATCH_QUEUE_LIMIT)


def check_backpressure(queue: str = "long") -> None:
    """Raise QueueFull (503 + Retry-After) when ``queue`` is at its limit; an unreadable
    depth lets the submission through (the dispatch windows still bound what it enqueues)."""
    limit = queue_limit()
    depth = queue_depth(queue)
    if depth is not None and depth >= limit:
        raise QueueFull(
            f"The {queue} queue holds {depth} tasks (limit {limit}); submit again later.",
            retry_after=int(settings.BATCH_QUEUE_RETRY_AFTER_S),
            details={"queue": queue, "depth": depth, "limit": limit},
        )
