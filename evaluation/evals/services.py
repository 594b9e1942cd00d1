"""Single and batch evaluations.

A batch evaluation runs on the batch engine's machinery (jobs/batch/services.py): its
per-model dispatch window (``window_size``: the model's rate limit over the window), its
code version for the frozen parameters, and the same claim/heartbeat discipline (atomic
``filter(status=X).update(...) == 1`` claims, a Celery task per item on the long queue that
takes an id, bounded dispatch that refills as items finish). The engine's BatchTask row is
tied to a corpus chunk and a framework version (non-null foreign keys); a rubric over dataset
samples is not a framework over chunks, so the smallest generalisation lives here: EvalRun is
the item row (sample x model x run) and this module its dispatcher, reusing the engine's
helpers rather than copying them.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q
from django.utils import timezone

from config.errors import CrucibleError, InvalidInput, NotFound
from evaluation.evals import rubrics as rubric_registry
from evaluation.evals import scorers
from evaluation.models import BatchEval, EvalDataset, EvalRun
from jobs import gateway

logger = logging.getLogger("crucible.evals")

MAX_BATCH_ITEMS = 20_000
ITEM_MAX_ATTEMPTS = 3
DEFAULT_DECODING = {"temperature": 0, "max_tokens": 128, "seed": 1}
DEFAULT_EMBED_MODEL = "offline/all-minilm-l6-v2"


class QueueFull(CrucibleError):
    """Backpressure: the queue the work would go to is past its limit."""

    status_code = 503
    code = "queue_full"

    def __init__(self, message: str, *, retry_after: int, details: Any = None):
        self.retry_after = retry_after
        super().__init__(message, details=details)


def _rubric(ref: str) -> rubric_registry.Rubric:
    try:
        return rubric_registry.rubric_get(ref)
    except rubric_registry.RubricError as exc:
        raise InvalidInput(str(exc), details={"field": "rubric"}) from exc


def _check_models(keys: list[str], capability: str = "chat") -> None:
    known = set(
        gateway.models(capability=capability).filter(key__in=keys).values_list("key", flat=True)
    )
    missing = [k for k in keys if k not in known]
    if missing:
        raise InvalidInput(
            f"Unknown or disabled {capability} model(s): {', '.join(missing)}",
            details={"field": "models", "unknown": missing},
        )


def environment() -> dict:
    from jobs.batch.services import code_version

    return {
        "code_version": code_version(),
        "python": platform.python_version(),
        "host": platform.node(),
        "pid": os.getpid(),
        "mode": "production" if getattr(settings, "REDIS_URL", "") else "embedded",
    }


def classify(exc: Exception) -> tuple[str, str]:
    """(failure class, message) of an exception raised while producing or scoring an answer."""
    if isinstance(exc, scorers.JudgeRefused):
        return EvalRun.Failure.JUDGE_REFUSAL, str(exc)
    if isinstance(exc, scorers.JudgeInvalid):
        return EvalRun.Failure.INVALID_OUTPUT, f"Judge: {exc}"
    if isinstance(exc, gateway.DeadlineExceeded):
        return EvalRun.Failure.TIMEOUT, exc.message
    if isinstance(exc, gateway.GatewayError):
        message = getattr(exc, "message", str(exc))
        details = exc.details if isinstance(exc.details, dict) else {}
        if "timeout" in str(details.get("reason", "")) or "did not answer within" in message:
            return EvalRun.Failure.TIMEOUT, message
        return EvalRun.Failure.PROVIDER_ERROR, f"{exc.code}: {message}"
    raise exc


# --- Executing one item -------------------------------------------------------------------------


def _generate(run: EvalRun, decoding: dict, *, interactive: bool) -> None:
    messages = [{"role": "user", "content": run.input}]
    if run.contexts:
        context = "\n".join(f"[{i + 1}] {c}" for i, c in enumerate(run.contexts))
        messages.insert(0, {"role": "system", "content": f"Answer from these contexts:\n{context}"})
    result = gateway.chat(
        model=run.model_key,
        request={"messages": messages, **decoding},
        caller=gateway.Caller(user=run.created_by, feature="eval", subject=run),
        interactive=interactive,
        run_index=run.run if run.batch_id else None,
    )
    meta = result.meta
    run.output = result.text or ""
    run.latency_ms = meta.latency_ms
    run.prompt_tokens += meta.prompt_tokens
    run.completion_tokens += meta.completion_tokens
    run.cost += Decimal(str(meta.cost))
    run.metadata["generation"] = {
        "request_id": meta.request_id,
        "cached": meta.cached,
        "attempts": meta.attempts,
        "provider": meta.provider,
    }


def execute(run: EvalRun, *, interactive: bool) -> EvalRun:
    """Produce the answer (unless given), score it, classify any failure, and save."""
    rubric = rubric_registry.rubric_get(run.rubric)
    params = run.metadata.get("parameters", {})
    run.attempts += 1
    run.started_at = run.started_at or timezone.now()
    try:
        if run.model_key:
            _generate(run, params.get("decoding", DEFAULT_DECODING), interactive=interactive)
        if not run.output.strip():
            run.status, run.failure = EvalRun.Status.FAILED, EvalRun.Failure.INVALID_OUTPUT
            run.error_message = "The model's answer is empty."
        else:
            scored = scorers.score(
                rubric,
                input=run.input,
                output=run.output,
                reference=run.reference,
                contexts=run.contexts,
                embed_model=params.get("embed_model"),
                judge_model=params.get("judge_model"),
                caller=gateway.Caller(user=run.created_by, feature="judge", subject=run),
            )
            run.scores, run.passed, run.judge = scored.scores, scored.passed, scored.judge
            run.prompt_tokens += scored.prompt_tokens
            run.completion_tokens += scored.completion_tokens
            run.cost += Decimal(str(scored.cost))
            run.status = EvalRun.Status.SUCCEEDED
            run.failure = EvalRun.Failure.BELOW_THRESHOLD if scored.passed is False else ""
    except (gateway.GatewayError, scorers.JudgeRefused, scorers.JudgeInvalid) as exc:
        if interactive and isinstance(exc, gateway.RateLimited | gateway.BudgetExceeded):
            run.delete()  # the caller answers 429/409: nothing half-done is kept
            raise
        failure, message = classify(exc)
        transient = getattr(exc, "transient", False)
        if run.batch_id and transient and run.attempts < ITEM_MAX_ATTEMPTS:
            run.status, run.error_message = EvalRun.Status.PENDING, message[:2000]
            run.save()
            return run
        if isinstance(exc, scorers.JudgeRefused | scorers.JudgeInvalid):
            run.judge = getattr(exc, "judge", run.judge)
            judge_dim = next(
                (d["key"] for d in rubric.dimensions if d["method"] == "judge"), "judge"
            )
            run.scores = {**run.scores, judge_dim: {"method": "judge", "error": message[:500]}}
        run.status, run.failure, run.error_message = EvalRun.Status.FAILED, failure, message[:2000]
        run.passed = False
    run.finished_at = timezone.now()
    run.save()
    return run


# --- Single evaluation --------------------------------------------------------------------------


def evaluation_create(
    *,
    user,
    rubric: str,
    model: str | None = None,
    input: str | None = None,
    reference: str = "",
    contexts: list[str] | None = None,
    output: str | None = None,
    dataset_id: int | None = None,
    sample_index: int | None = None,
    decoding: dict | None = None,
    judge_model: str | None = None,
    embed_model: str | None = DEFAULT_EMBED_MODEL,
) -> EvalRun:
    """Score one sample (inline or a dataset's) and persist it. The answer is ``output`` when
    given, else ``model``'s answer through the gateway. Rate limits and budget errors are
    raised (the API answers 429/409); every other failure is stored on the run."""
    spec = _rubric(rubric)
    sample = None
    dataset = None
    if dataset_id is not None:
        dataset = EvalDataset.objects.filter(pk=dataset_id).first()
        if dataset is None:
            raise NotFound(f"No dataset {dataset_id}.")
        sample = dataset.samples.filter(index=sample_index or 0).first()
        if sample is None:
            raise InvalidInput(
                f"Dataset {dataset.label} has no sample {sample_index or 0} "
                f"(it has {dataset.sample_count}).",
                details={"field": "sample_index"},
            )
        input, reference, contexts = sample.input, sample.reference, sample.contexts
        if output is None:
            output = sample.metadata.get("output")
    if not input:
        raise InvalidInput(
            "Give an input, or a dataset and a sample index.", details={"field": "input"}
        )
    if output is None and not model:
        raise InvalidInput(
            "Give a model to answer, or the output to score.", details={"field": "model"}
        )
    if model:
        _check_models([model])
    if spec.uses_judge:
        _check_models([judge_model or spec.judge["default_model"]])
    if embed_model:
        embed_model = (
            embed_model
            if gateway.models(capability="embeddings").filter(key=embed_model).exists()
            else None
        )
    run = EvalRun.objects.create(
        dataset=dataset,
        sample=sample,
        sample_index=sample.index if sample else None,
        model_key=model if output is None else "",
        rubric=spec.name,
        rubric_version=spec.version,
        rubric_sha256=spec.sha256,
        input=input,
        reference=reference or "",
        contexts=list(contexts or []),
        output=output or "",
        status=EvalRun.Status.RUNNING,
        created_by=user if getattr(user, "pk", None) else None,
        metadata={
            "parameters": {
                "decoding": {**DEFAULT_DECODING, **(decoding or {})},
                "judge_model": judge_model or (spec.judge or {}).get("default_model"),
                "embed_model": embed_model,
                "answering_model": model if output is None else None,
            },
            "rubric": {"name": spec.name, "version": spec.version, "sha256": spec.sha256},
            "environment": environment(),
        },
    )
    return execute(run, interactive=True)


def evaluation_get(run_id) -> EvalRun:
    run = EvalRun.objects.select_related("dataset").filter(pk=run_id).first()
    if run is None:
        raise NotFound(f"No evaluation run {run_id}.")
    return run


# --- Backpressure -------------------------------------------------------------------------------


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


def check_backpressure(queue: str = "long") -> None:
    limit = int(getattr(settings, "EVAL_QUEUE_LIMIT", 1000))
    depth = queue_depth(queue)
    if depth is not None and depth >= limit:
        raise QueueFull(
            f"The {queue} queue holds {depth} tasks (limit {limit}); submit again later.",
            retry_after=int(getattr(settings, "EVAL_QUEUE_RETRY_AFTER_S", 30)),
            details={"queue": queue, "depth": depth, "limit": limit},
        )


# --- Batch evaluations --------------------------------------------------------------------------


def batch_eval_create(
    *,
    user,
    dataset_id: int,
    models: list[str],
    rubric: str,
    runs: int = 1,
    name: str = "",
    decoding: dict | None = None,
    judge_model: str | None = None,
    embed_model: str | None = DEFAULT_EMBED_MODEL,
    enqueue: bool = True,
) -> BatchEval:
    spec = _rubric(rubric)
    dataset = EvalDataset.objects.filter(pk=dataset_id).first()
    if dataset is None:
        raise InvalidInput(f"No dataset {dataset_id}.", details={"field": "dataset"})
    models = list(dict.fromkeys(models))
    if not models:
        raise InvalidInput("Name at least one model.", details={"field": "models"})
    _check_models(models)
    judge = judge_model or (spec.judge or {}).get("default_model")
    if spec.uses_judge:
        _check_models([judge])
    if embed_model and not gateway.models(capability="embeddings").filter(key=embed_model).exists():
        embed_model = None
    count = dataset.sample_count * len(models) * runs
    if count > MAX_BATCH_ITEMS:
        raise InvalidInput(f"{count:,} items is over the limit of {MAX_BATCH_ITEMS:,}.")
    check_backpressure("long")
    params = {
        "decoding": {**DEFAULT_DECODING, **(decoding or {})},
        "judge_model": judge if spec.uses_judge else None,
        "embed_model": embed_model,
    }
    env = environment()
    with transaction.atomic():
        batch = BatchEval.objects.create(
            name=name or f"{dataset.label} x {len(models)} model(s)",
            dataset=dataset,
            rubric=spec.name,
            rubric_version=spec.version,
            rubric_sha256=spec.sha256,
            models_list=models,
            runs=runs,
            frozen={**params, "environment": env, "dataset_sha256": dataset.sha256},
            item_count=count,
            created_by=user if getattr(user, "pk", None) else None,
        )
        samples = list(dataset.samples.order_by("index"))
        owner = batch.created_by
        meta = {
            "parameters": params,
            "rubric": {"name": spec.name, "version": spec.version, "sha256": spec.sha256},
            "environment": env,
        }
        EvalRun.objects.bulk_create(
            [
                EvalRun(
                    batch=batch,
                    dataset=dataset,
                    sample=s,
                    sample_index=s.index,
                    model_key=m,
                    run=r,
                    rubric=spec.name,
                    rubric_version=spec.version,
                    rubric_sha256=spec.sha256,
                    input=s.input,
                    reference=s.reference,
                    contexts=s.contexts,
                    status=EvalRun.Status.PENDING,
                    created_by=owner,
                    metadata=meta,
                )
                for s in samples
                for m in models
                for r in range(1, runs + 1)
            ],
            batch_size=1000,
        )
        if enqueue:
            transaction.on_commit(lambda: batch_eval_dispatch(batch_id=batch.pk))
    return batch


def _enqueue_item(item_id: str) -> None:
    from evaluation.evals.tasks import eval_item_run

    eval_item_run.delay(item_id)


def batch_eval_dispatch(*, batch_id, enqueue: Callable[[str], object] | None = None) -> int:
    """Move up to each model's window of pending items to queued and enqueue them (the engine's
    per-model window). Returns how many were enqueued."""
    from jobs.batch.services import window_size
    from jobs.models import RegisteredModel

    enqueue = enqueue or _enqueue_item
    batch = BatchEval.objects.filter(pk=batch_id).first()
    if batch is None or not batch.is_active:
        return 0
    sent = 0
    models = {m.key: m for m in RegisteredModel.objects.filter(key__in=batch.models_list)}
    for key in batch.models_list:
        window = window_size(models[key]) if key in models else 4
        busy = batch.items.filter(
            model_key=key, status__in=[EvalRun.Status.QUEUED, EvalRun.Status.RUNNING]
        ).count()
        free = max(0, window - busy)
        if not free:
            continue
        ids = list(
            batch.items.filter(model_key=key, status=EvalRun.Status.PENDING)
            .order_by("sample_index", "run")
            .values_list("pk", flat=True)[:free]
        )
        for item_id in ids:
            if EvalRun.objects.filter(pk=item_id, status=EvalRun.Status.PENDING).update(
                status=EvalRun.Status.QUEUED
            ):
                enqueue(str(item_id))
                sent += 1
    return sent


def item_claim(item_id) -> EvalRun | None:
    now = timezone.now()
    claimed = EvalRun.objects.filter(
        pk=item_id, status__in=[EvalRun.Status.QUEUED, EvalRun.Status.PENDING]
    ).update(status=EvalRun.Status.RUNNING, started_at=now)
    if claimed != 1:
        return None
    run = EvalRun.objects.select_related("batch", "created_by").get(pk=item_id)
    BatchEval.objects.filter(pk=run.batch_id, status=BatchEval.Status.QUEUED).update(
        status=BatchEval.Status.RUNNING, started_at=now
    )
    if run.batch and run.batch.status == BatchEval.Status.CANCELLED:
        EvalRun.objects.filter(pk=item_id).update(status=EvalRun.Status.CANCELLED)
        return None
    return run


def item_run(*, item_id, dispatch: bool = True) -> str | None:
    """Claim, execute and settle one batch item (the Celery task's body)."""
    run = item_claim(item_id)
    if run is None:
        return None
    execute(run, interactive=False)
    batch_finish_if_done(batch_id=run.batch_id)
    if dispatch:
        batch_eval_dispatch(batch_id=run.batch_id)
    return run.status


def batch_finish_if_done(*, batch_id) -> bool:
    batch = BatchEval.objects.get(pk=batch_id)
    if not batch.is_active or batch.items.filter(status__in=EvalRun.OPEN).exists():
        return False
    counts = batch.items.aggregate(ok=Count("pk", filter=Q(status=EvalRun.Status.SUCCEEDED)))
    status = BatchEval.Status.COMPLETED if counts["ok"] else BatchEval.Status.FAILED
    from evaluation.evals.aggregates import aggregates

    data = aggregates(batch)
    updated = BatchEval.objects.filter(pk=batch_id, status__in=BatchEval.ACTIVE).update(
        status=status,
        aggregates=data,
        finished_at=timezone.now(),
        error_message="" if counts["ok"] else "Every item failed; see the failure taxonomy.",
    )
    return updated == 1


def batch_eval_cancel(*, batch: BatchEval) -> BatchEval:
    if not batch.is_active:
        raise InvalidInput(
            f"The batch evaluation is {batch.status}; only active ones can be cancelled."
        )
    from evaluation.evals.aggregates import aggregates

    batch.items.filter(status__in=[EvalRun.Status.PENDING, EvalRun.Status.QUEUED]).update(
        status=EvalRun.Status.CANCELLED
    )
    BatchEval.objects.filter(pk=batch.pk, status__in=BatchEval.ACTIVE).update(
        status=BatchEval.Status.CANCELLED, finished_at=timezone.now(), aggregates=aggregates(batch)
    )
    batch.refresh_from_db()
    return batch


def batch_eval_get(batch_id) -> BatchEval:
    batch = BatchEval.objects.select_related("dataset").filter(pk=batch_id).first()
    if batch is None:
        raise NotFound(f"No batch evaluation {batch_id}.")
    return batch


def batch_eval_run_inline(*, batch: BatchEval) -> BatchEval:
    """Run every item in this process (tests, `manage.py` use, a demo without a worker)."""
    while True:
        ids = list(
            batch.items.filter(status__in=[EvalRun.Status.PENDING, EvalRun.Status.QUEUED])
            .order_by("sample_index", "model_key", "run")
            .values_list("pk", flat=True)
        )
        if not ids:
            break
        for item_id in ids:
            item_run(item_id=item_id, dispatch=False)
    batch_finish_if_done(batch_id=batch.pk)
    batch.refresh_from_db()
    return batch


def items_recover(*, stale_after_s: float = 900) -> int:
    """Items left running by a dead worker go back to pending (the beat's reconcile)."""
    cutoff = timezone.now() - timedelta(seconds=stale_after_s)
    return EvalRun.objects.filter(
        batch__isnull=False, status=EvalRun.Status.RUNNING, started_at__lt=cutoff
    ).update(status=EvalRun.Status.PENDING)
