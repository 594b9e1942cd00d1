"""The engine: bounded dispatch per model, the claimed run of one task (any kind), windows,
pause/resume/cancel, crash recovery and inline runs."""

from __future__ import annotations

import logging
import math
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta

from django.conf import settings
from django.db import connections, transaction
from django.db.models import Count, F, Q
from django.utils import timezone

from config import longtasks
from config.errors import Conflict, NotFound
from jobs import gateway
from jobs.batch.kinds import Outcome, TaskKind, kind_get
from jobs.batch.models import BatchJob, BatchTask
from jobs.batch.services.common import BATCH_THREADS, MESSAGE_TASKS, TASK_MAX_ATTEMPTS
from jobs.batch.services.framework_kind import JobContext
from jobs.batch.services.planning import window_size
from jobs.models import RegisteredModel

logger = logging.getLogger("crucible.batch")


# --- Dispatch -----------------------------------------------------------------------------------


def enqueue_dispatch(job_id) -> None:
    from jobs.batch.tasks import batch_dispatch

    batch_dispatch.delay(str(job_id))


def _enqueue_window(job_id, task_ids: list[str]) -> None:
    from jobs.batch.tasks import batch_run_window

    batch_run_window.delay(str(job_id), task_ids)


def job_dispatch(*, job_id, enqueue: Callable[[object, list[str]], object] | None = None) -> dict:
    """Top up each model's window: move pending tasks to queued (at most the window minus what
    is queued or running) and enqueue them, MESSAGE_TASKS to a message (one window runner
    each). Returns {model: queued now}."""
    enqueue = enqueue or _enqueue_window
    job = BatchJob.objects.filter(pk=job_id).first()
    if job is None or job.status != BatchJob.Status.RUNNING:
        return {}
    models = {
        m.key: m
        for m in RegisteredModel.objects.select_related("provider").filter(
            key__in=[m["key"] for m in job.frozen["models"]]
        )
    }
    open_counts = dict(
        job.tasks.filter(status__in=(BatchTask.Status.QUEUED, BatchTask.Status.RUNNING))
        .values_list("model_key")
        .annotate(n=Count("pk"))
    )
    now = timezone.now()
    out = {}
    for key, model in models.items():
        room = window_size(model) - open_counts.get(key, 0)
        if room <= 0:
            continue
        ids = list(
            job.tasks.filter(model_key=key, status=BatchTask.Status.PENDING)
            .filter(Q(not_before__isnull=True) | Q(not_before__lte=now))
            .order_by("id")
            .values_list("pk", flat=True)[:room]
        )
        if not ids:
            continue
        token = uuid.uuid4().hex
        BatchTask.objects.filter(pk__in=ids, status=BatchTask.Status.PENDING).update(
            status=BatchTask.Status.QUEUED, dispatch_token=token, queued_at=now
        )
        mine = list(
            BatchTask.objects.filter(pk__in=ids, dispatch_token=token, status="queued").values_list(
                "pk", flat=True
            )
        )
        # Split so that every worker process gets a share of a small window too.
        size = max(1, min(MESSAGE_TASKS, math.ceil(len(mine) / 4)))
        for start in range(0, len(mine), size):
            enqueue(job.pk, mine[start : start + size])
        out[key] = len(mine)
    return out


def job_finish_if_done(job_id) -> bool:
    """Mark a running job completed (or failed when some task failed) once no task is open."""
    job = BatchJob.objects.filter(pk=job_id).only("status").first()
    if job is None or job.status != BatchJob.Status.RUNNING:
        return False
    if BatchTask.objects.filter(job_id=job_id, status__in=BatchTask.OPEN).exists():
        return False
    failed = BatchTask.objects.filter(job_id=job_id, status=BatchTask.Status.FAILED).exists()
    status = BatchJob.Status.FAILED if failed else BatchJob.Status.COMPLETED
    done = (
        BatchJob.objects.filter(pk=job_id, status=BatchJob.Status.RUNNING).update(
            status=status, finished_at=timezone.now()
        )
        == 1
    )
    if done:
        job_kind(job_id).progress(job_id=job_id, final=True)
    return done


# --- Running one task ---------------------------------------------------------------------------


def job_kind(job_id) -> TaskKind:
    kind = BatchJob.objects.filter(pk=job_id).values_list("kind", flat=True).first()
    return kind_get(kind or BatchJob.FRAMEWORK)


def job_context(job_id):
    """The context of a job's kind (what its tasks share), or None when the job is gone."""
    job = BatchJob.objects.select_related("created_by").filter(pk=job_id).first()
    return None if job is None else kind_get(job.kind).context(job)


# What a task run loads: the task and, for a framework task, its chunk and document.
_TASK_FIELDS = (
    "id",
    "job_id",
    "chunk_id",
    "framework_version_id",
    "model_key",
    "run",
    "attempts",
    "model_revision",
    "item_id",
    "chunk__text",
    "chunk__document__title",
    "chunk__document__external_id",
    "chunk__document__author",
    "chunk__document__date",
)


def task_run(
    *,
    task_id: str,
    claim: str | None = None,
    dispatch: bool = True,
    ctx: JobContext | None = None,
    finish: bool = True,
) -> str | None:
    """Claim a queued task (one conditional UPDATE), run it through the gateway, store its one
    result (the final write is conditional on the claim), then top up the model's window
    (``dispatch``) and finish the job when it was the last (``finish``; a window runner does
    both once for its window). Returns the task's final status, or None when the task was not
    this worker's to run."""
    claim = claim or longtasks.worker_claim()
    now = timezone.now()
    claimed = BatchTask.objects.filter(
        pk=task_id, status__in=(BatchTask.Status.QUEUED, BatchTask.Status.PENDING)
    ).update(
        status=BatchTask.Status.RUNNING,
        claimed_by=claim,
        heartbeat_at=now,
        started_at=now,
        attempts=F("attempts") + 1,
    )
    if claimed != 1:
        return None
    # The job's status comes with the task (one round trip): a paused or cancelled job's
    # task goes back unrun.
    task = BatchTask.objects.select_related("chunk", "chunk__document", "job")
    task = task.only(*_TASK_FIELDS, "job__status").get(pk=task_id)
    job_status = task.job.status
    mine = BatchTask.objects.filter(pk=task_id, status=BatchTask.Status.RUNNING, claimed_by=claim)
    if job_status != BatchJob.Status.RUNNING:
        back = BatchTask.Status.CANCELLED if job_status == "cancelled" else BatchTask.Status.PENDING
        mine.update(status=back, claimed_by="", attempts=F("attempts") - 1)
        return back
    if ctx is None or ctx.job_id != task.job_id:
        ctx = job_context(task.job_id)
    kind = ctx.kind
    failed_outside = False  # failed by the engine, not by the kind's own run
    try:
        outcome = kind.run(task, ctx)
    except gateway.GatewayError as exc:
        outcome = _failure(task, exc)
        failed_outside = outcome.status == BatchTask.Status.FAILED
    except Exception as exc:  # a bug or an unexpected library error: fail the task, keep going
        logger.exception("batch task %s crashed", task_id)
        outcome = Outcome(
            BatchTask.Status.FAILED,
            {"error_code": "internal_error", "error_message": f"{type(exc).__name__}: {exc}"},
        )
        failed_outside = True
    fields = dict(outcome.fields)
    if "calls" in fields:
        fields["calls"] = F("calls") + fields["calls"]
    if outcome.status == BatchTask.Status.PENDING:
        fields.update(claimed_by="", dispatch_token="")
    else:
        fields["finished_at"] = timezone.now()
    wrote = mine.update(status=outcome.status, **fields) == 1
    if not wrote:
        return None
    if failed_outside:
        kind.failed(
            job_id=task.job_id,
            task_ids=[task.pk],
            code=outcome.fields["error_code"],
            message=outcome.fields.get("error_message", ""),
        )
    if dispatch or finish:
        after_task(job_id=task.job_id, dispatch=dispatch)
    return outcome.status


def tasks_run_window(
    *,
    job_id,
    task_ids: list[str],
    threads: int | None = None,
    dispatch: bool = True,
    on_done: Callable[[str | None], object] | None = None,
) -> dict:
    """Run a window of a job's tasks in this process: each is claimed atomically just before
    it runs (as ``task_run`` alone does: a task claimed elsewhere is skipped, and a claim's
    heartbeat is its own start), ``threads`` at a time (their calls wait on the gateway's
    shared rate limits); then the window tops up the job's dispatch, finishes the job when it
    was the last, and schedules the statistics, once for the window. Returns {status: n}."""
    ctx = job_context(job_id)
    out: dict[str, int] = {}
    if ctx is None or not task_ids:
        return out
    threads = max(1, min(len(task_ids), threads or BATCH_THREADS))

    counted = threading.Lock()

    def one(pk: str) -> None:
        status = task_run(task_id=pk, dispatch=False, ctx=ctx, finish=False)
        with counted:
            out[status or "skipped"] = out.get(status or "skipped", 0) + 1
        if on_done:
            on_done(status)

    if threads == 1:
        for pk in task_ids:
            one(pk)
    else:
        pending: queue.SimpleQueue[str] = queue.SimpleQueue()
        for pk in task_ids:
            pending.put(pk)

        def worker() -> None:
            try:
                while True:
                    try:
                        pk = pending.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        one(pk)
                    except Exception:  # a database error: the reconcile recovers its claim
                        logger.exception("batch task %s could not run", pk)
            finally:
                connections.close_all()  # this thread's own connections

        pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    after_task(job_id=job_id, dispatch=dispatch)
    return out


def _failure(task: BatchTask, exc: gateway.GatewayError) -> Outcome:
    fields = {
        "error_code": exc.code,
        "error_message": exc.message[:2000] if hasattr(exc, "message") else str(exc)[:2000],
        "calls": 1,
    }
    if exc.transient and task.attempts < TASK_MAX_ATTEMPTS:
        conf = gateway.settings_effective()
        base, cap = float(conf["backoff_base_s"]), float(conf["backoff_cap_s"])
        delay = random.uniform(0, min(cap, base * 2**task.attempts))
        if exc.retry_after:
            delay = max(delay, float(exc.retry_after))
        return Outcome(
            BatchTask.Status.PENDING,
            {**fields, "not_before": timezone.now() + timedelta(seconds=delay)},
        )
    if exc.transient:
        fields["error_message"] = (
            f"Retries exhausted after {task.attempts} tries: " + fields["error_message"]
        )
    return Outcome(BatchTask.Status.FAILED, fields)


def after_task(*, job_id, dispatch: bool = True) -> None:
    """What a finished task triggers: top up the window (workers; an in-process run claims
    pending tasks itself), finish the job, refresh statistics (throttled)."""
    if dispatch:
        job_dispatch(job_id=job_id)
    if not job_finish_if_done(job_id) and dispatch:
        job_kind(job_id).progress(job_id=job_id, final=False)


# --- Control ------------------------------------------------------------------------------------


def job_get(job_id) -> BatchJob:
    """A framework job (the batch pages and API); other kinds have their own pages."""
    try:
        return BatchJob.objects.frameworks().select_related("corpus", "created_by").get(pk=job_id)
    except (BatchJob.DoesNotExist, ValueError, TypeError) as exc:
        raise NotFound(f"No batch job {job_id}.") from exc


def job_pause(*, job: BatchJob) -> BatchJob:
    if job.status != BatchJob.Status.RUNNING:
        raise Conflict(f"Only a running job can be paused; this one is {job.status}.")
    BatchJob.objects.filter(pk=job.pk, status=BatchJob.Status.RUNNING).update(status="paused")
    # Queued tasks go back to pending; running ones finish (their result is kept).
    job.tasks.filter(status=BatchTask.Status.QUEUED).update(status=BatchTask.Status.PENDING)
    job.refresh_from_db()
    return job


def job_resume(*, job: BatchJob) -> BatchJob:
    """Resume a paused job, or a running one after a crash: stale claims go back to pending
    (nothing finished runs again) and dispatch starts."""
    if job.status not in (BatchJob.Status.PAUSED, BatchJob.Status.RUNNING):
        raise Conflict(f"A {job.status} job cannot be resumed.")
    BatchJob.objects.filter(pk=job.pk).update(status=BatchJob.Status.RUNNING, finished_at=None)
    tasks_recover(job_id=job.pk)
    transaction.on_commit(lambda: enqueue_dispatch(job.pk))
    job.refresh_from_db()
    return job


def job_cancel(*, job: BatchJob) -> BatchJob:
    if not job.is_active:
        raise Conflict(f"A {job.status} job cannot be cancelled.")
    BatchJob.objects.filter(pk=job.pk).update(
        status=BatchJob.Status.CANCELLED, finished_at=timezone.now()
    )
    job.tasks.filter(status__in=(BatchTask.Status.PENDING, BatchTask.Status.QUEUED)).update(
        status=BatchTask.Status.CANCELLED
    )
    job.refresh_from_db()
    return job


def tasks_recover(*, job_id=None, stale_after_s: float | None = None) -> dict:
    """Claimed-but-unfinished tasks whose heartbeat is stale go back to pending; queued tasks
    whose message was lost (queued longer than the stale time) go back to pending too. The
    atomic claim means a message that does arrive later finds nothing to do."""
    stale = stale_after_s if stale_after_s is not None else settings.LONG_TASK_STALE_AFTER_S
    cutoff = timezone.now() - timedelta(seconds=stale)
    qs = BatchTask.objects.all() if job_id is None else BatchTask.objects.filter(job_id=job_id)
    running = qs.filter(status=BatchTask.Status.RUNNING).filter(
        Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True)
    )
    lost = list(running.values_list("pk", flat=True))
    given_up: dict[tuple, list[str]] = {}
    for pk, job_pk, kind in running.filter(attempts__gte=TASK_MAX_ATTEMPTS).values_list(
        "pk", "job_id", "job__kind"
    ):
        given_up.setdefault((job_pk, kind), []).append(pk)
    exhausted = running.filter(attempts__gte=TASK_MAX_ATTEMPTS).update(
        status=BatchTask.Status.FAILED,
        claimed_by="",
        error_code="worker_lost",
        error_message="Its worker stopped on every try.",
        finished_at=timezone.now(),
    )
    for (job_pk, kind), ids in given_up.items():
        kind_get(kind).failed(
            job_id=job_pk,
            task_ids=ids,
            code="worker_lost",
            message="Its worker stopped on every try.",
        )
    reclaimed = running.update(status=BatchTask.Status.PENDING, claimed_by="", dispatch_token="")
    if lost:
        # Their worker died mid-call: settle the calls it wrote ahead (the ledger keeps each
        # call that reached the provider, answered from the cache when the answer got there).
        gateway.calls_recover(subject_type=BatchTask, subject_ids=lost)
    requeued = qs.filter(status=BatchTask.Status.QUEUED, queued_at__lt=cutoff).update(
        status=BatchTask.Status.PENDING, dispatch_token=""
    )
    return {"reclaimed": reclaimed, "requeued": requeued, "failed": exhausted}


def batch_reconcile() -> dict:
    """Beat: recover stale tasks of running jobs and kick their dispatch."""
    out = tasks_recover()
    jobs = list(
        BatchJob.objects.filter(status=BatchJob.Status.RUNNING).values_list("pk", flat=True)
    )
    for pk in jobs:
        try:
            enqueue_dispatch(pk)
        except Exception:  # the broker is down: the next reconcile tries again
            logger.exception("could not enqueue the dispatch of batch job %s", pk)
        job_finish_if_done(pk)
    out["jobs"] = len(jobs)
    return out


def job_run_inline(*, job: BatchJob, progress: Callable[[int], object] | None = None) -> dict:
    """Run a job's open tasks in this process (``manage.py run_batch``): stale claims are
    recovered first, then pending and queued tasks are claimed one by one (the same atomic
    claim as the workers, so a worker running beside it never runs a task twice)."""
    BatchJob.objects.filter(pk=job.pk, status=BatchJob.Status.PAUSED).update(status="running")
    tasks_recover(job_id=job.pk)
    while True:
        now = timezone.now()
        ids = list(
            job.tasks.filter(status__in=(BatchTask.Status.PENDING, BatchTask.Status.QUEUED))
            .filter(Q(not_before__isnull=True) | Q(not_before__lte=now))
            .order_by("id")
            .values_list("pk", flat=True)[:500]
        )
        if not ids:
            if job.tasks.filter(status=BatchTask.Status.PENDING).exists():
                time.sleep(0.2)  # a retry waiting for its backoff
                continue
            break
        ctx = job_context(job.pk)
        for pk in ids:
            status = task_run(task_id=pk, dispatch=False, ctx=ctx, finish=False)
            if status in (None, BatchTask.Status.PENDING, BatchTask.Status.CANCELLED) and (
                BatchJob.objects.filter(pk=job.pk).values_list("status", flat=True).first()
                != BatchJob.Status.RUNNING
            ):
                return _summary(job)  # paused or cancelled meanwhile
            if status and status != BatchTask.Status.PENDING and progress:
                progress(1)
    job_finish_if_done(job.pk)
    return _summary(job)


def _summary(job: BatchJob) -> dict:
    counts = dict(job.tasks.values_list("status").annotate(n=Count("pk")))
    job.refresh_from_db()
    return {"job": str(job.pk), "status": job.status, "tasks": counts}
