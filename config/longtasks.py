"""Long tasks that hold a status row: the worker's claim, heartbeats with throttled progress,
cooperative stopping, and the beat reconcile that restarts a task whose worker died.

Why not broker redelivery alone: the filesystem broker (the embedded default) never redelivers
a task whose worker died, and Redis only after its visibility timeout (hours). So a long task
writes a heartbeat on its row while it works, and ``config.tasks.reconcile_long_tasks`` (beat,
every minute, control queue) hands rows whose heartbeat is older than
``settings.LONG_TASK_STALE_AFTER_S`` back to their app, which claims them again atomically and
re-enqueues them.

No Django app is imported here: apps pass their model, their status values and their enqueue
function in, and register their reconcile step with :func:`recoverer` in their tasks module
(Celery imports every app's tasks module when a worker starts).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, models
from django.db.models import Q
from django.utils import timezone

logger = logging.getLogger("crucible.longtasks")

# At most one progress write per row this often (seconds): the page polls every few seconds
# and a write per item would flood SQLite on a fast stage.
PROGRESS_INTERVAL_S = 2.0

_RECOVERERS: dict[str, Callable[[], dict]] = {}


class LongTaskFields(models.Model):
    """The claim and heartbeat columns a long task's row needs (an abstract model)."""

    heartbeat_at = models.DateTimeField(
        null=True, blank=True, db_index=True, help_text="Last sign of life of its worker"
    )
    claimed_by = models.CharField(
        max_length=200, blank=True, help_text="host:pid:token of the worker that runs it"
    )
    attempts = models.PositiveIntegerField(default=0, help_text="Times a worker started it")

    class Meta:
        abstract = True


class Stopped(Exception):
    """The row is no longer this worker's to work on: it was cancelled, or claimed again by
    another worker after this one was taken for dead."""


def worker_claim() -> str:
    """A claim unique to this worker process and this attempt."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"[:200]


def stale_cutoff(now: datetime | None = None) -> datetime:
    return (now or timezone.now()) - timedelta(seconds=settings.LONG_TASK_STALE_AFTER_S)


def stale_q(cutoff: datetime) -> Q:
    """Rows whose worker has given no sign of life since ``cutoff`` (rows from before
    heartbeats existed count from their start)."""
    return Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, started_at__lt=cutoff)


class Heartbeat:
    """Writes on a claimed row, each one conditional on the row still being this worker's.

    Every write also refreshes ``heartbeat_at``. A write that matches no row means the run was
    cancelled or re-claimed: it raises :class:`Stopped`, and the task ends without touching the
    row again. ``tick`` writes at most every ``interval`` seconds (and checks for a cancel at the
    same time); ``write`` always writes.
    """

    def __init__(
        self,
        model: type[models.Model],
        pk,
        *,
        claim: str,
        running: str,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.model, self.pk, self.claim, self.running = model, pk, claim, running
        self.interval = PROGRESS_INTERVAL_S if interval is None else interval
        self.clock = clock
        self.last = clock()
        self.writes = 0

    lost = False  # set by the keepalive thread when the row stopped being ours

    @contextmanager
    def keepalive(self, every: float | None = None) -> Iterator[Heartbeat]:
        """Refresh ``heartbeat_at`` from a background thread every ``every`` seconds (default: a
        fifth of LONG_TASK_STALE_AFTER_S) while the block runs, so that one long step (a model
        load, a slow batch) is not taken for a dead worker. The thread dies with the process,
        which is the point. It uses its own database connection: run it in a worker, not inside
        a test's transaction."""
        every = every or max(1.0, settings.LONG_TASK_STALE_AFTER_S / 5)
        stop = threading.Event()

        def beat() -> None:
            try:
                while not stop.wait(every):
                    if self.rows().update(heartbeat_at=timezone.now()) != 1:
                        self.lost = True
                        return
            except Exception:  # never let the heartbeat break the task; the reconcile copes
                logger.exception("heartbeat of %s %s failed", self.model.__name__, self.pk)
            finally:
                connection.close()

        thread = threading.Thread(target=beat, name=f"heartbeat-{self.pk}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=every + 30)

    def rows(self):
        return self.model.objects.filter(pk=self.pk, status=self.running, claimed_by=self.claim)

    def write(self, **fields) -> None:
        if self.lost:
            raise Stopped(f"{self.model.__name__} {self.pk} is no longer claimed by {self.claim}")
        now = timezone.now()
        if self.rows().update(heartbeat_at=now, updated_at=now, **fields) != 1:
            raise Stopped(f"{self.model.__name__} {self.pk} is no longer claimed by {self.claim}")
        self.last = self.clock()
        self.writes += 1

    def tick(self, **fields) -> bool:
        """Write if the last write is ``interval`` seconds old; True when it wrote."""
        if self.lost:
            raise Stopped(f"{self.model.__name__} {self.pk} is no longer claimed by {self.claim}")
        if self.clock() - self.last < self.interval:
            return False
        self.write(**fields)
        return True

    def finish(self, **fields) -> bool:
        """The final write (completed, failed): False when the row was no longer ours."""
        return self.rows().update(updated_at=timezone.now(), **fields) == 1


def reclaim_stale(
    model: type[models.Model],
    *,
    running: str,
    pending: str,
    failed: str,
    enqueue: Callable[[str], object],
    failed_fields: Callable[[int], dict],
    max_attempts: int | None = None,
) -> dict:
    """Hand every stale running row back to ``pending`` and enqueue it again, or fail it when
    it has already been started ``max_attempts`` times. Each row is taken with one conditional
    UPDATE, so two reconciles running at once (or a worker that comes back) never both win.
    """
    max_attempts = max_attempts or settings.LONG_TASK_MAX_ATTEMPTS
    now = timezone.now()
    cutoff = stale_cutoff(now)
    requeued, failed_ids = [], []
    for pk, attempts in model.objects.filter(stale_q(cutoff), status=running).values_list(
        "pk", "attempts"
    ):
        mine = model.objects.filter(stale_q(cutoff), pk=pk, status=running)
        if attempts >= max_attempts:
            if mine.update(status=failed, claimed_by="", updated_at=now, **failed_fields(attempts)):
                failed_ids.append(str(pk))
            continue
        if mine.update(status=pending, claimed_by="", heartbeat_at=now, updated_at=now):
            requeued.append(str(pk))
            try:
                enqueue(str(pk))
            except Exception:  # the broker is down: the next reconcile tries again
                logger.exception("could not enqueue %s %s again", model.__name__, pk)
                model.objects.filter(pk=pk, status=pending).update(
                    status=running, heartbeat_at=cutoff - timedelta(seconds=1)
                )
    if requeued or failed_ids:
        logger.warning(
            "%s: restarted %s, failed %s (their worker stopped)",
            model.__name__,
            requeued,
            failed_ids,
        )
    return {"requeued": requeued, "failed": failed_ids}


def requeue_overdue(
    model: type[models.Model],
    *,
    running: str,
    pending: str,
    after_s: float,
    enqueue: Callable[[str], object],
) -> list[str]:
    """For rows without heartbeat columns: a row still running ``after_s`` seconds after it
    started (choose more than the task's hard time limit, so its worker cannot still be on it)
    goes back to ``pending`` and is enqueued again; its task claims it as a new one."""
    cutoff = timezone.now() - timedelta(seconds=after_s)
    requeued = []
    for pk in model.objects.filter(status=running, started_at__lt=cutoff).values_list(
        "pk", flat=True
    ):
        if model.objects.filter(pk=pk, status=running, started_at__lt=cutoff).update(
            status=pending
        ):
            requeued.append(str(pk))
            try:
                enqueue(str(pk))
            except Exception:
                logger.exception("could not enqueue %s %s again", model.__name__, pk)
    if requeued:
        logger.warning("%s: restarted %s (their worker stopped)", model.__name__, requeued)
    return requeued


def recoverer(name: str) -> Callable[[Callable[[], dict]], Callable[[], dict]]:
    """Register an app's reconcile step (a function of no arguments returning a summary)."""

    def register(fn: Callable[[], dict]) -> Callable[[], dict]:
        _RECOVERERS[name] = fn
        return fn

    return register


def reconcile_all() -> dict:
    """Run every registered reconcile step; one failing never stops the others."""
    out = {}
    for name, fn in sorted(_RECOVERERS.items()):
        try:
            out[name] = fn()
        except Exception as exc:
            logger.exception("long-task reconcile %s failed", name)
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out
