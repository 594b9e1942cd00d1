"""Single and batch evaluations.

A batch evaluation is a batch job of kind 'eval' (evaluation/evals/batch.py): the engine of
jobs/batch runs it (bulk task creation with deterministic ids, per-model dispatch windows,
atomic claims, retries of transient errors with backoff and Retry-After, crash recovery,
cancel), and this app's kind scores each task's sample into its item (an EvalRun, one per
task). A single evaluation runs here, inline.
"""

from __future__ import annotations

import logging
import os
import platform
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from config.backpressure import check_backpressure
from config.errors import InvalidInput, NotFound
from evaluation.evals import rubrics as rubric_registry
from evaluation.evals import scorers
from evaluation.models import BatchEval, EvalDataset, EvalRun
from jobs import gateway

logger = logging.getLogger("crucible.evals")

EVAL_KIND = "eval"  # the batch job kind of batch evaluations (evaluation/evals/batch.py)

MAX_BATCH_ITEMS = 20_000
DEFAULT_DECODING = {"temperature": 0, "max_tokens": 128, "seed": 1}
DEFAULT_EMBED_MODEL = "offline/all-minilm-l6-v2"


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


def _generate(run: EvalRun, decoding: dict, *, interactive: bool, subject) -> None:
    messages = [{"role": "user", "content": run.input}]
    if run.contexts:
        context = "\n".join(f"[{i + 1}] {c}" for i, c in enumerate(run.contexts))
        messages.insert(0, {"role": "system", "content": f"Answer from these contexts:\n{context}"})
    result = gateway.chat(
        model=run.model_key,
        request={"messages": messages, **decoding},
        caller=gateway.Caller(user=run.created_by, feature="eval", subject=subject),
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


def produce_and_score(run: EvalRun, rubric, *, interactive: bool, subject=None) -> int:
    """Produce the answer (unless given) and score it into ``run`` (not saved). Gateway errors
    and judge refusals are raised for the caller to classify. Returns the gateway calls made.
    ``subject`` is what the ledger ties the calls to (a batch item's task; else the run)."""
    params = run.metadata.get("parameters", {})
    subject = run if subject is None else subject
    calls = 0
    if run.model_key:
        calls += 1
        _generate(
            run, params.get("decoding", DEFAULT_DECODING), interactive=interactive, subject=subject
        )
    if not run.output.strip():
        run.status, run.failure = EvalRun.Status.FAILED, EvalRun.Failure.INVALID_OUTPUT
        run.error_message = "The model's answer is empty."
        run.passed = False
        return calls
    scored = scorers.score(
        rubric,
        input=run.input,
        output=run.output,
        reference=run.reference,
        contexts=run.contexts,
        embed_model=params.get("embed_model"),
        judge_model=params.get("judge_model"),
        caller=gateway.Caller(user=run.created_by, feature="judge", subject=subject),
    )
    calls += 1 if scored.judge else 0
    run.scores, run.passed, run.judge = scored.scores, scored.passed, scored.judge
    run.prompt_tokens += scored.prompt_tokens
    run.completion_tokens += scored.completion_tokens
    run.cost += Decimal(str(scored.cost))
    run.status = EvalRun.Status.SUCCEEDED
    run.failure = EvalRun.Failure.BELOW_THRESHOLD if scored.passed is False else ""
    run.error_message = ""
    return calls


def record_failure(run: EvalRun, rubric, exc: Exception) -> None:
    """Store a failure's class and message on ``run`` (not saved)."""
    failure, message = classify(exc)
    if isinstance(exc, scorers.JudgeRefused | scorers.JudgeInvalid):
        run.judge = getattr(exc, "judge", run.judge)
        judge_dim = next((d["key"] for d in rubric.dimensions if d["method"] == "judge"), "judge")
        run.scores = {**run.scores, judge_dim: {"method": "judge", "error": message[:500]}}
    run.status, run.failure, run.error_message = EvalRun.Status.FAILED, failure, message[:2000]
    run.passed = False


def evaluation_execute(run: EvalRun) -> EvalRun:
    """A single evaluation: produce the answer (unless given), score it, classify any
    failure, and save. Rate-limit and budget refusals delete the run and are raised (the API
    answers 429/409: nothing half-done is kept)."""
    rubric = rubric_registry.rubric_get(run.rubric)
    run.attempts += 1
    run.started_at = run.started_at or timezone.now()
    try:
        produce_and_score(run, rubric, interactive=True)
    except (gateway.GatewayError, scorers.JudgeRefused, scorers.JudgeInvalid) as exc:
        if isinstance(exc, gateway.RateLimited | gateway.BudgetExceeded):
            run.delete()
            raise
        record_failure(run, rubric, exc)
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
    return evaluation_execute(run)


def evaluation_get(run_id) -> EvalRun:
    run = EvalRun.objects.select_related("dataset").filter(pk=run_id).first()
    if run is None:
        raise NotFound(f"No evaluation run {run_id}.")
    return run


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
    """Validate, then create the batch evaluation, its batch job (kind 'eval': one task per
    sample x model x run) and one item per task, in one transaction; the engine dispatches
    after commit (``enqueue``; else the job waits paused for ``batch_eval_run_inline``)."""
    from jobs.batch.services import job_create_items

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
    owner = user if getattr(user, "pk", None) else None
    label = f"{spec.name}@{spec.version}"
    name = name or f"{dataset.label} x {len(models)} model(s)"
    with transaction.atomic():
        samples = {s.pk: s for s in dataset.samples.order_by("index")}
        job = job_create_items(
            kind=EVAL_KIND,
            name=name,
            user=owner,
            label=label,
            item_ids=list(samples),
            models=models,
            runs=runs,
            frozen={
                "decoding": params["decoding"],
                "evaluation": {
                    "rubric": {"name": spec.name, "version": spec.version, "sha256": spec.sha256},
                    "dataset": {"id": dataset.pk, "label": dataset.label, "sha256": dataset.sha256},
                    "judge_model": params["judge_model"],
                    "embed_model": embed_model,
                },
            },
            start=enqueue,
        )
        batch = BatchEval.objects.create(
            name=name,
            dataset=dataset,
            job=job,
            rubric=spec.name,
            rubric_version=spec.version,
            rubric_sha256=spec.sha256,
            models_list=models,
            runs=runs,
            frozen={
                **params,
                "environment": env,
                "dataset_sha256": dataset.sha256,
                "code_version": job.frozen["code_version"],
                "job": str(job.pk),
            },
            item_count=count,
            created_by=owner,
        )
        meta = {
            "parameters": params,
            "rubric": {"name": spec.name, "version": spec.version, "sha256": spec.sha256},
            "environment": env,
        }
        tasks = job.tasks.order_by("item_id", "model_key", "run").values_list(
            "pk", "item_id", "model_key", "run"
        )
        EvalRun.objects.bulk_create(
            (
                EvalRun(
                    batch=batch,
                    task_id=task_pk,
                    dataset=dataset,
                    sample=samples[item],
                    sample_index=samples[item].index,
                    model_key=model,
                    run=run,
                    rubric=spec.name,
                    rubric_version=spec.version,
                    rubric_sha256=spec.sha256,
                    input=samples[item].input,
                    reference=samples[item].reference,
                    contexts=samples[item].contexts,
                    status=EvalRun.Status.PENDING,
                    created_by=owner,
                    metadata=meta,
                )
                for task_pk, item, model, run in tasks.iterator(chunk_size=2000)
            ),
            batch_size=1000,
        )
    return batch


def batch_finish(*, job_id) -> bool:
    """The batch job ended: store the final aggregates and the status (completed when some
    item was scored, failed when none was)."""
    from evaluation.evals.aggregates import aggregates

    batch = BatchEval.objects.filter(job_id=job_id).first()
    if batch is None or not batch.is_active:
        return False
    scored = batch.items.filter(status=EvalRun.Status.SUCCEEDED).exists()
    updated = BatchEval.objects.filter(pk=batch.pk, status__in=BatchEval.ACTIVE).update(
        status=BatchEval.Status.COMPLETED if scored else BatchEval.Status.FAILED,
        aggregates=aggregates(batch),
        finished_at=timezone.now(),
        error_message="" if scored else "Every item failed; see the failure taxonomy.",
    )
    return updated == 1


def batch_eval_cancel(*, batch: BatchEval) -> BatchEval:
    """Cancel the batch job (pending and queued tasks are cancelled; running ones finish) and
    mark the items that will not run."""
    from evaluation.evals.aggregates import aggregates
    from jobs.batch.models import BatchTask
    from jobs.batch.services import job_cancel

    if not batch.is_active:
        raise InvalidInput(
            f"The batch evaluation is {batch.status}; only active ones can be cancelled."
        )
    with transaction.atomic():
        if batch.job is not None and batch.job.is_active:
            job_cancel(job=batch.job)
            batch.items.filter(task__status=BatchTask.Status.CANCELLED).update(
                status=EvalRun.Status.CANCELLED
            )
        else:
            batch.items.filter(status__in=[EvalRun.Status.PENDING, EvalRun.Status.QUEUED]).update(
                status=EvalRun.Status.CANCELLED
            )
        BatchEval.objects.filter(pk=batch.pk, status__in=BatchEval.ACTIVE).update(
            status=BatchEval.Status.CANCELLED,
            finished_at=timezone.now(),
            aggregates=aggregates(batch),
        )
    batch.refresh_from_db()
    return batch


def batch_eval_get(batch_id) -> BatchEval:
    batch = BatchEval.objects.select_related("dataset", "job").filter(pk=batch_id).first()
    if batch is None:
        raise NotFound(f"No batch evaluation {batch_id}.")
    return batch


def batch_eval_run_inline(*, batch: BatchEval) -> BatchEval:
    """Run every open item in this process on the engine's inline runner (tests, a demo
    without a worker), with the same atomic claims as the workers."""
    from jobs.batch.services import job_run_inline

    job_run_inline(job=batch.job)
    batch.refresh_from_db()
    return batch
