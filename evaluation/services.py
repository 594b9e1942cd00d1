"""Validation workflows: start a run, execute it, rate blind, recompute, report, share, approve.

The science lives in evaluation/scoring.py (models), evaluation/stats.py (figures and intervals),
evaluation/suites.py (versioned test sets) and evaluation/report.py (the PDF); this module
decides what runs when, stores every input and output, and keeps each step safe to repeat.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import random
import secrets
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.db import IntegrityError, transaction
from django.db.models import F, Max, Q, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from config import longtasks
from config.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from config.storage import storage_listdir, storage_open, storage_read, storage_save, storage_uri
from evaluation.models import (
    Approval,
    GeneratedResponse,
    HumanRating,
    JudgeScore,
    RatingPair,
    Report,
    RunStatus,
    ShareLink,
    Side,
    Suite,
    ValidationRun,
)
from training.models import Artifact, BaseModel, JobStatus, TrainingJob

logger = logging.getLogger("crucible.evaluation")

EVALUATOR_VERSION = "1.0.0"
RUBRIC_SUITES = (Suite.EMOTIONAL_INTELLIGENCE, Suite.BRAND_VOICE)
EXAMPLES_K = 10
EI_TARGET_PCT = 40.0

# Stage -> progress (percent) when the stage starts.
STAGES = {
    "preparing": 2,
    "loading_models": 5,
    "perplexity": 10,
    "retention": 20,
    "generating": 35,
    "judging": 70,
    "aggregating": 90,
    "report": 95,
}


# A run in one of these can still be cancelled.
RUNNABLE = (RunStatus.PENDING, RunStatus.RUNNING)


# --- Start ---------------------------------------------------------------------------------


def _enqueue(run: ValidationRun) -> None:
    from evaluation.tasks import execute_validation_run

    run_id = str(run.pk)
    # robust: a broker hiccup is logged, never turned into an error of the caller's request.
    transaction.on_commit(lambda: execute_validation_run.delay(run_id), robust=True)


def validation_run_create(
    *,
    job: TrainingJob,
    user: AbstractUser | None,
    trigger: str = ValidationRun.Trigger.MANUAL,
    enqueue: bool = True,
) -> ValidationRun:
    """A pending run for a completed job with an adapter, started in the background."""
    if job.status != JobStatus.COMPLETED:
        raise Conflict(
            f"Only a completed job can be validated (this one is {job.get_status_display()}).",
            details={"status": job.status},
        )
    adapter = job.artifacts.filter(kind=Artifact.Kind.ADAPTER).first()
    if adapter is None:
        raise Conflict("The job has no adapter to validate.", details={"job_id": str(job.pk)})
    with transaction.atomic():
        # Lock the job row so two requests can't both start a run.
        TrainingJob.objects.select_for_update().filter(pk=job.pk).first()
        active = ValidationRun.objects.filter(job=job).active().first()
        if active is not None:
            raise Conflict(
                "A validation of this job is already in progress.",
                details={"run_id": str(active.pk), "status": active.status},
            )
        run = ValidationRun.objects.create(
            job=job,
            trigger=trigger,
            created_by=user,
            evaluator_version=EVALUATOR_VERSION,
            base_model=job.base_model.path or job.base_model.name,
            adapter_uri=storage_uri(adapter.storage_path),
        )
        if enqueue:
            _enqueue(run)
    return run


def validation_on_job_completed(*, job: TrainingJob) -> ValidationRun | None:
    """Start the automatic validation of a job that just completed (never breaks training)."""
    if not settings.EVALUATION_AUTO_START:
        return None
    if ValidationRun.objects.filter(job=job).exists():
        return None
    try:
        with transaction.atomic():
            return validation_run_create(job=job, user=None, trigger=ValidationRun.Trigger.AUTO)
    except Exception:
        logger.exception("automatic validation of job %s could not be started", job.pk)
        return None


# --- Execute -------------------------------------------------------------------------------


def _progress(
    run: ValidationRun,
    stage: str,
    progress: float | None = None,
    *,
    detail: str = "",
    **fields,
) -> None:
    """A stage boundary: always written (and a cancel or a lost claim noticed, see _beat)."""
    value = STAGES.get(stage, 0) if progress is None else progress
    _beat(run).write(stage=stage, progress=round(value, 1), stage_detail=detail[:200], **fields)
    run.stage, run.progress, run.stage_detail = stage, value, detail
    for key, item in fields.items():
        setattr(run, key, item)


def _item_progress(
    run: ValidationRun, stage: str, done: int, total: int, detail: str, *, end: str
) -> None:
    """Progress inside a stage, after each item: ``done`` of ``total`` moves the bar from the
    stage's start to the start of ``end``. Written at most every PROGRESS_INTERVAL_S seconds,
    which is also when a cancel is noticed."""
    start, stop = STAGES[stage], STAGES[end]
    value = start + (stop - start) * done / max(total, 1)
    if _beat(run).tick(stage=stage, progress=round(value, 1), stage_detail=detail[:200]):
        run.stage, run.progress, run.stage_detail = stage, value, detail


def _beat(run: ValidationRun) -> longtasks.Heartbeat:
    """Writes on the run, conditional on it still being running and claimed by this worker:
    one that finds the run cancelled or claimed by another worker raises longtasks.Stopped."""
    beat = getattr(run, "_heartbeat", None)
    if beat is None:
        beat = run._heartbeat = longtasks.Heartbeat(
            ValidationRun, run.pk, claim=run.claimed_by, running=RunStatus.RUNNING
        )
    return beat


def _base_model_dir(base: BaseModel) -> str:
    if base.source == BaseModel.Source.OFFLINE:
        from gpu.model import ensure_offline_model

        return str(ensure_offline_model(base.name, Path(settings.TRAINING_MODEL_CACHE)))
    return base.path or base.name


def _walk(path: str) -> list[str]:
    folders, files = storage_listdir(path)
    found = [f"{path}/{name}" for name in files]
    for folder in folders:
        found += _walk(f"{path}/{folder}")
    return found


@contextmanager
def _adapter_dir(job: TrainingJob) -> Iterator[str]:
    """The job's adapter copied from storage into a temporary folder (local disk or S3)."""
    adapter = job.artifacts.filter(kind=Artifact.Kind.ADAPTER).first()
    if adapter is None:
        raise Conflict("The job has no adapter to validate.")
    root = adapter.storage_path.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="crucible-adapter-") as tmp:
        for path in _walk(root):
            target = Path(tmp) / path[len(root) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(storage_read(path))
        if not (Path(tmp) / "adapter_config.json").is_file():
            raise Conflict(f"The adapter at {root} has no adapter_config.json.")
        yield tmp


def _read_conversations(job: TrainingJob):
    from gpu.data import read_conversations

    with storage_open(job.training_file.storage_path) as handle:
        lines = [raw.decode("utf-8-sig") if isinstance(raw, bytes) else raw for raw in handle]
    return read_conversations(lines)


def held_out_documents(*, job: TrainingJob) -> list[list[dict]]:
    """The job's held-out conversations, split exactly as the worker split them."""
    from gpu.data import split_conversations

    conversations = _read_conversations(job)
    seed = job.configuration["hyperparameters"]["seed"]
    _, held_out = split_conversations(conversations, job.configuration["validation_split"], seed)
    return [c.messages for c in held_out]


def _dimensions(suite) -> list[dict]:
    return list(suite.rubric.get("dimensions", []))


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's CPU threads set to ``n`` for the block (0 = leave as is), then restored."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def validation_run_execute(*, run_id: str, keepalive: bool = False) -> ValidationRun | None:
    """Claim a pending run and execute it. Safe to run twice: only one claim succeeds.

    A run left "running" by a worker that died (no heartbeat for LONG_TASK_STALE_AFTER_S) is
    claimed again too, when Celery redelivers its task or the beat reconcile re-enqueues it;
    the new attempt resumes from what the old one stored. A run that is cancelled or claimed
    by another worker meanwhile stops at its next progress write and is left as it is.

    ``keepalive``: a background thread refreshes the heartbeat while the run works (the Celery
    task turns it on; it needs its own database connection, so not inside a test transaction).
    """
    now = timezone.now()
    claim = longtasks.worker_claim()
    claimed = (
        ValidationRun.objects.filter(pk=run_id)
        .filter(
            Q(status=RunStatus.PENDING)
            | (Q(status=RunStatus.RUNNING) & longtasks.stale_q(longtasks.stale_cutoff(now)))
        )
        .update(
            status=RunStatus.RUNNING,
            started_at=Coalesce(F("started_at"), Value(now)),
            stage="preparing",
            stage_detail="",
            progress=1,
            updated_at=now,
            heartbeat_at=now,
            claimed_by=claim,
            attempts=F("attempts") + 1,
        )
    )
    if claimed != 1:
        return None
    run = ValidationRun.objects.select_related("job", "job__base_model", "job__training_file").get(
        pk=run_id
    )
    try:
        with _beat(run).keepalive() if keepalive else nullcontext():
            _execute(run)
    except longtasks.Stopped:
        logger.info("validation run %s stopped: cancelled or claimed by another worker", run.pk)
    except Exception as exc:
        logger.exception("validation run %s failed", run.pk)
        _beat(run).finish(
            status=RunStatus.FAILED,
            error_type=type(exc).__name__,
            error_message=(getattr(exc, "message", None) or str(exc) or repr(exc))[:5000],
            completed_at=timezone.now(),
        )
    finally:
        gc.collect()
    run.refresh_from_db()
    return run


def validation_run_cancel(*, run: ValidationRun, user: AbstractUser | None) -> ValidationRun:
    """Cancel a pending or running run. A pending one never starts; a running one stops at its
    next progress write (within a few seconds, between two items). What it stored stays."""
    now = timezone.now()
    cancelled = ValidationRun.objects.filter(pk=run.pk, status__in=RUNNABLE).update(
        status=RunStatus.CANCELLED,
        stage_detail="Cancelled" + (f" by {user}" if user else ""),
        cancelled_by=user,
        completed_at=now,
        updated_at=now,
    )
    run.refresh_from_db()
    if not cancelled:
        raise Conflict(
            f"Only a pending or running validation can be cancelled "
            f"(this one is {run.get_status_display().lower()}).",
            details={"status": run.status},
        )
    logger.info("validation run %s cancelled by %s", run.pk, user)
    return run


def validation_runs_recover() -> dict:
    """Beat reconcile: runs whose worker died (no heartbeat for LONG_TASK_STALE_AFTER_S) go
    back to pending and are enqueued again; a run that has already been started
    LONG_TASK_MAX_ATTEMPTS times fails with the reason instead."""
    from evaluation.tasks import execute_validation_run

    def failed(attempts: int) -> dict:
        return {
            "error_type": "WorkerLost",
            "error_message": (
                f"The worker running this validation stopped {attempts} times without finishing "
                "it (a restart, a deploy, or out of memory). Validate again once the cause is "
                "fixed."
            ),
            "completed_at": timezone.now(),
        }

    return longtasks.reclaim_stale(
        ValidationRun,
        running=RunStatus.RUNNING,
        pending=RunStatus.PENDING,
        failed=RunStatus.FAILED,
        enqueue=lambda pk: execute_validation_run.delay(pk),
        failed_fields=failed,
    )


def _suite_versions(suites: dict) -> dict:
    return {n: {"version": s.version, "sha256": s.sha256} for n, s in suites.items()}


def _execute(run: ValidationRun) -> None:
    from evaluation import scoring
    from evaluation.suites import all_suites, conversation_for

    job = run.job
    hp = job.configuration["hyperparameters"]
    suites = all_suites()
    n_boot = settings.EVALUATION_BOOTSTRAP
    seed = settings.EVALUATION_SEED
    decoding = {
        "max_new_tokens": settings.EVALUATION_MAX_NEW_TOKENS,
        "temperature": settings.EVALUATION_TEMPERATURE,
        "do_sample": settings.EVALUATION_TEMPERATURE > 0,
        "batch_size": settings.EVALUATION_BATCH_SIZE,
        "max_length": hp["max_seq_length"],
        "judge": settings.EVALUATION_JUDGE,
    }
    seeds = {"split": hp["seed"], "generation": seed, "bootstrap": seed, "examples": seed}
    # A run started again after its worker died resumes from what it stored, provided it
    # measures with the same suites, decoding and seeds; otherwise it starts clean.
    resume = (
        run.attempts > 1
        and run.suites == _suite_versions(suites)
        and run.seeds == seeds
        and all((run.decoding or {}).get(k) == v for k, v in decoding.items())
    )
    metrics: dict = dict(run.metrics or {}) if resume else {}
    _progress(
        run,
        "preparing",
        detail="Resuming where the previous worker stopped" if resume else "",
        suites=_suite_versions(suites),
        decoding={**(run.decoding or {}), **decoding} if resume else decoding,
        seeds=seeds,
        metrics=metrics,
        examples=[],
        error_type="",
        error_message="",
    )
    if not resume:
        GeneratedResponse.objects.filter(run=run).delete()  # a re-executed run starts clean

    documents = held_out_documents(job=job)
    if not documents:
        raise InvalidInput("The job has no held-out conversations to measure perplexity on.")
    base_dir = _base_model_dir(job.base_model)
    with _adapter_dir(job) as adapter_dir, _torch_threads(settings.EVALUATION_TORCH_THREADS):
        _progress(run, "loading_models")
        models = scoring.load_models(base_model_dir=base_dir, adapter_dir=adapter_dir)

        if "perplexity" not in metrics:
            _progress(run, "perplexity", detail=f"Perplexity: 0/{len(documents)} conversations")
            metrics["perplexity"] = _perplexity(run, models, documents, hp, n_boot, seed)
        _progress(run, "retention", metrics=metrics)

        if "retention" not in metrics:
            metrics["retention"] = _retention(
                run, models, suites["knowledge_retention"].items, n_boot, seed
            )
        _progress(run, "generating", metrics=metrics)

        # Responses for the rubric suites, both sides, same prompts and decoding.
        run.decoding = {
            **decoding,
            "system_prompts": {
                name: next(
                    (
                        m["content"]
                        for m in conversation_for(suites[name], suites[name].items[0])
                        if m["role"] == "system"
                    ),
                    "",
                )
                for name in RUBRIC_SUITES
            },
        }
        _beat(run).write(decoding=run.decoding)
        _generate_all(run, suites, models, decoding, seed)

        # Judge scores for every response.
        _progress(run, "judging")
        _judge_all(run, suites, models)
        del models
    gc.collect()

    _progress(run, "aggregating")
    validation_metrics_recompute(run=run, base_metrics=metrics)
    _progress(run, "report")
    run.refresh_from_db()
    validation_report_generate(run=run, user=None, allow_running=True)
    _beat(run).finish(
        status=RunStatus.COMPLETED,
        stage="completed",
        stage_detail="",
        progress=100.0,
        completed_at=timezone.now(),
    )


def _perplexity(run: ValidationRun, models, documents, hp: dict, n_boot: int, seed: int) -> dict:
    """Perplexity on the held-out split, one conversation at a time, paired bootstrap."""
    from evaluation import scoring, stats

    total = len(documents)
    sides: dict[bool, list] = {False: [], True: []}
    for use_adapter, label in ((False, "base model"), (True, "trained adapter")):
        for i, document in enumerate(documents):
            sides[use_adapter] += scoring.document_nll(
                models, [document], use_adapter=use_adapter, max_length=hp["max_seq_length"]
            )
            done = len(sides[False]) + len(sides[True])
            _item_progress(
                run,
                "perplexity",
                done,
                2 * total,
                f"Perplexity: {i + 1}/{total} conversations ({label})",
                end="retention",
            )
    # Documents without a scored token (nothing after truncation) carry no information.
    scored = [(b, t) for b, t in zip(sides[False], sides[True], strict=True) if b.tokens]
    base_nll, trained_nll = [b for b, _ in scored], [t for _, t in scored]
    ppl = stats.perplexity_improvement(base_nll, trained_nll, n_boot=n_boot, seed=seed)
    ppl["display"] = stats.display_line(
        "Perplexity", ppl["baseline"], ppl["trained"], higher_is_better=False
    )
    ppl["documents"] = [
        {"baseline": [b.nll_sum, b.tokens], "trained": [t.nll_sum, t.tokens]}
        for b, t in zip(base_nll, trained_nll, strict=True)
    ]
    return ppl


def _retention(run: ValidationRun, models, questions: list[dict], n_boot: int, seed: int) -> dict:
    """Knowledge retention: option log-likelihoods, no free-text parsing; one question at a
    time so that the page can say how far it is."""
    from evaluation import scoring, stats

    total = len(questions)
    logliks: dict[bool, list] = {False: [], True: []}
    for use_adapter, label in ((False, "base model"), (True, "trained adapter")):
        for i, question in enumerate(questions):
            logliks[use_adapter] += scoring.option_logliks(
                models, [question], use_adapter=use_adapter
            )
            done = len(logliks[False]) + len(logliks[True])
            _item_progress(
                run,
                "retention",
                done,
                2 * total,
                f"Retention: {i + 1}/{total} questions ({label})",
                end="generating",
            )
    answers = [q["answer"] for q in questions]
    base_ok = scoring.mcq_correct(logliks[False], answers)
    trained_ok = scoring.mcq_correct(logliks[True], answers)
    ret = stats.retention(
        base_ok,
        trained_ok,
        categories=[q["category"] for q in questions],
        n_boot=n_boot,
        seed=seed,
    )
    ret["display"] = stats.display_line(
        "Knowledge accuracy",
        100 * ret["baseline_accuracy"],
        100 * ret["trained_accuracy"],
        unit="%",
    )
    ret["questions"] = [
        {"id": q["id"], "baseline": bool(b), "trained": bool(t)}
        for q, b, t in zip(questions, base_ok, trained_ok, strict=True)
    ]
    return ret


def _generate_all(run: ValidationRun, suites: dict, models, decoding: dict, seed: int) -> None:
    """Responses for both rubric suites and both sides, one batch at a time, each batch stored
    as soon as it is generated: a resumed run generates only the responses it lacks."""
    from evaluation import scoring
    from evaluation.suites import conversation_for

    steps = [(s, side) for s in RUBRIC_SUITES for side in (Side.BASELINE, Side.TRAINED)]
    total = sum(len(suites[name].items) for name, _ in steps)
    stored = set(GeneratedResponse.objects.filter(run=run).values_list("suite", "item_id", "side"))
    done = sum(1 for key in stored if key[0] in RUBRIC_SUITES)
    size = max(1, int(decoding["batch_size"]))
    for suite_name, side in steps:
        suite = suites[suite_name]
        items = suite.items
        # Batches are cut from the whole suite, so a resumed batch keeps its seed.
        for b, start in enumerate(range(0, len(items), size)):
            chunk = [
                i for i in items[start : start + size] if (suite_name, i["id"], side) not in stored
            ]
            if not chunk:
                continue
            generations = scoring.generate(
                models,
                [conversation_for(suite, item) for item in chunk],
                use_adapter=side == Side.TRAINED,
                max_new_tokens=decoding["max_new_tokens"],
                seed=seed + b,
                temperature=decoding["temperature"],
                batch_size=size,
            )
            # ignore_conflicts: a worker taken for dead that still finishes a batch adds nothing.
            GeneratedResponse.objects.bulk_create(
                [
                    GeneratedResponse(
                        run=run,
                        suite=suite_name,
                        item_id=item["id"],
                        category=item.get("category", ""),
                        side=side,
                        prompt=item["prompt"],
                        text=g.text,
                        stopped=g.stopped,
                        new_tokens=g.new_tokens,
                        seconds=g.seconds,
                    )
                    for item, g in zip(chunk, generations, strict=True)
                ],
                ignore_conflicts=True,
            )
            done += len(chunk)
            label = "base model" if side == Side.BASELINE else "trained adapter"
            _item_progress(
                run,
                "generating",
                done,
                total,
                f"Responses: {done}/{total} ({Suite(suite_name).label}, {label})",
                end="judging",
            )


def _judge_name(run: ValidationRun) -> tuple[str, str | None]:
    """(judge name, the gateway model key; None for the offline digit-likelihood judge).

    ``endpoint``: EVALUATION_JUDGE_MODEL, any registered chat model, called through the model
    gateway. ``offline``: the run's own loaded base model scores by next-token digit
    likelihoods in process (it needs logits, which chat completions do not give, and reuses
    the weights already loaded for the run instead of loading them again)."""
    if settings.EVALUATION_JUDGE == "endpoint":
        return settings.EVALUATION_JUDGE_MODEL, settings.EVALUATION_JUDGE_MODEL
    return f"offline:{run.job.base_model.name}", None


def _judge_all(run: ValidationRun, suites: dict, models) -> None:
    """Judge scores for every response not yet judged by this judge, stored in small batches
    (a resumed run judges only what is left)."""
    from evaluation import scoring
    from jobs import gateway

    if settings.EVALUATION_JUDGE == "none":
        return
    judge, judge_model = _judge_name(run)
    caller = gateway.Caller(feature="judge", subject=run, attribution=f"validation {run.pk}")
    responses = list(
        GeneratedResponse.objects.filter(run=run)
        .exclude(judge_scores__judge=judge)
        .order_by("suite", "item_id", "side")
    )
    total = GeneratedResponse.objects.filter(run=run).count()
    done = total - len(responses)
    rows: list[JudgeScore] = []

    def store() -> None:
        JudgeScore.objects.bulk_create(rows, ignore_conflicts=True)
        rows.clear()

    for response in responses:
        suite = suites[response.suite]
        if judge_model is not None:
            scores, raw = scoring.judge_with_gateway(
                model=judge_model,
                dimensions=_dimensions(suite),
                prompt=response.prompt,
                response=response.text,
                caller=caller,
            )
        else:
            scores = scoring.judge_offline(
                models, rubric=suite.rubric, prompt=response.prompt, response=response.text
            )
            raw = {"method": "digit log-likelihood"}
        rows.append(
            JudgeScore(
                response=response,
                judge=judge,
                scores={k: int(v) for k, v in scores.items()},
                raw=raw,
            )
        )
        done += 1
        if len(rows) >= 20:
            store()
        _item_progress(
            run, "judging", done, total, f"Judging: {done}/{total} responses", end="aggregating"
        )
    store()


# --- Figures from responses, judge scores and human ratings ---------------------------------


def _mean_scores(score_dicts: list[dict]) -> dict[str, float]:
    sums: dict[str, list[float]] = defaultdict(list)
    for scores in score_dicts:
        for key, value in scores.items():
            if value is not None:
                sums[key].append(float(value))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _scores_by_item(run: ValidationRun, suite: str) -> dict:
    """{item_id: {side: {"human": [scores...], "judge": scores | None}}} plus the raters."""
    table: dict = defaultdict(lambda: {s: {"human": [], "judge": None} for s in Side.values})
    for score in JudgeScore.objects.filter(response__run=run, response__suite=suite).select_related(
        "response"
    ):
        table[score.response.item_id][score.response.side]["judge"] = score.scores
    for rating in HumanRating.objects.filter(run=run, suite=suite):
        table[rating.item_id][Side.BASELINE]["human"].append(rating.baseline_scores)
        table[rating.item_id][Side.TRAINED]["human"].append(rating.trained_scores)
    return table


def _chosen(entry: dict) -> tuple[dict[str, float] | None, str | None]:
    """One side of one item: the mean of its human ratings, else the judge's scores."""
    if entry["human"]:
        return _mean_scores(entry["human"]), "human"
    if entry["judge"]:
        return {k: float(v) for k, v in entry["judge"].items()}, "judge"
    return None, None


def _combined_source(sources: set[str]) -> str | None:
    sources.discard(None)
    if not sources:
        return None
    if sources == {"human"}:
        return "human"
    if sources == {"judge"}:
        return "judge"
    return "human+judge"


def _agreement(run: ValidationRun, suites: tuple[str, ...], n_boot: int, seed: int):
    """Krippendorff's alpha of the human raters and the judge over (item, side, dimension)."""
    from evaluation import stats

    ratings = list(HumanRating.objects.filter(run=run, suite__in=suites))
    if not ratings:
        return None
    judges = {
        (s.response.suite, s.response.item_id, s.response.side): s.scores
        for s in JudgeScore.objects.filter(response__run=run, response__suite__in=suites)
        .select_related("response")
        .only("scores", "response__suite", "response__item_id", "response__side")
    }
    units: list[tuple] = []
    by_rater: dict[int, dict[tuple, float]] = defaultdict(dict)
    for rating in ratings:
        for side, scores in (
            (Side.BASELINE, rating.baseline_scores),
            (Side.TRAINED, rating.trained_scores),
        ):
            for dim, value in scores.items():
                unit = (rating.suite, rating.item_id, side, dim)
                by_rater[rating.rater_id][unit] = float(value)
                units.append(unit)
    units = sorted(set(units))
    rows = [[rater.get(u) for u in units] for rater in by_rater.values()]
    judge_row = [
        (float(judges[u[:3]][u[3]]) if u[:3] in judges and u[3] in judges[u[:3]] else None)
        for u in units
    ]
    if any(v is not None for v in judge_row):
        rows.append(judge_row)
    if len(rows) < 2:
        return None
    result = stats.krippendorff_alpha(rows, level="ordinal", n_boot=n_boot, seed=seed)
    result["raters"] = {"humans": len(by_rater), "judge": any(v is not None for v in judge_row)}
    return result


def _ei_metrics(run: ValidationRun, suite, n_boot: int, seed: int) -> tuple[dict, dict]:
    from evaluation import stats

    table = _scores_by_item(run, Suite.EMOTIONAL_INTELLIGENCE)
    dims = [d["key"] for d in _dimensions(suite)]
    base_items, trained_items, sources, deltas = [], [], set(), {}
    per_dim: dict[str, dict[str, list[float]]] = {d: {"baseline": [], "trained": []} for d in dims}
    for item in suite.items:
        entry = table.get(item["id"])
        if entry is None:
            base_items.append(None)
            trained_items.append(None)
            continue
        base, base_src = _chosen(entry[Side.BASELINE])
        trained, trained_src = _chosen(entry[Side.TRAINED])
        # One source per item, the same for both sides: humans when they rated the item.
        if base_src != trained_src:
            base = trained = None
        sources |= {base_src} if base is not None else set()
        b = sum(base.values()) / len(base) if base else None
        t = sum(trained.values()) / len(trained) if trained else None
        base_items.append(b)
        trained_items.append(t)
        if b is not None and t is not None:
            deltas[item["id"]] = t - b
            for d in dims:
                if d in base and d in trained:
                    per_dim[d]["baseline"].append(base[d])
                    per_dim[d]["trained"].append(trained[d])
    result = stats.rubric_improvement(
        base_items, trained_items, n_boot=n_boot, seed=seed, target_pct=EI_TARGET_PCT
    )
    result["source"] = _combined_source(sources)
    result["per_dimension"] = {
        d: {
            "name": next(x["name"] for x in _dimensions(suite) if x["key"] == d),
            "baseline": sum(v["baseline"]) / len(v["baseline"]) if v["baseline"] else None,
            "trained": sum(v["trained"]) / len(v["trained"]) if v["trained"] else None,
            "n": len(v["baseline"]),
        }
        for d, v in per_dim.items()
    }
    result["human_ratings"] = HumanRating.objects.filter(
        run=run, suite=Suite.EMOTIONAL_INTELLIGENCE
    ).count()
    result["items_human"] = sum(1 for e in table.values() if e[Side.TRAINED]["human"])
    result["display"] = stats.display_line(
        "Emotional Intelligence", result["baseline_mean"], result["trained_mean"], unit="/5"
    )
    return result, deltas


def _brand_metrics(run: ValidationRun, suite, n_boot: int, seed: int) -> dict:
    from evaluation import stats

    table = _scores_by_item(run, Suite.BRAND_VOICE)
    out = {}
    for side in (Side.TRAINED, Side.BASELINE):
        rows, sources, ids = [], set(), []
        for item in suite.items:
            entry = table.get(item["id"])
            scores, source = _chosen(entry[side]) if entry else (None, None)
            if scores:
                rows.append(scores)
                ids.append(item["id"])
                sources.add(source)
        result = stats.brand_consistency(rows, n_boot=n_boot, seed=seed)
        for flag in result["flagged"]:
            flag["item_id"] = ids[flag["index"]]
        result["source"] = _combined_source(sources)
        out[side] = result
    trained = out[Side.TRAINED]
    trained["baseline"] = {
        k: out[Side.BASELINE].get(k) for k in ("consistency_pct", "mean_score", "n_responses")
    }
    trained["human_ratings"] = HumanRating.objects.filter(run=run, suite=Suite.BRAND_VOICE).count()
    names = {d["key"]: d["name"] for d in _dimensions(suite)}
    for key, row in trained["per_characteristic"].items():
        row["name"] = names.get(key, key)
        base_row = out[Side.BASELINE]["per_characteristic"].get(key) or {}
        row["baseline_mean"] = base_row.get("mean")
    trained["display"] = (
        f"Brand voice consistency: {trained['consistency_pct']:.0f}% "
        f"(target {trained['target_pct']:.0f}%)"
        if trained["consistency_pct"] is not None
        else "Brand voice consistency: awaiting scores"
    )
    return trained


def validation_metrics_recompute(*, run: ValidationRun, base_metrics: dict | None = None) -> dict:
    """EI, brand voice, agreement, generation health and examples from what is stored now."""
    from evaluation import stats
    from evaluation.suites import all_suites

    n_boot = settings.EVALUATION_BOOTSTRAP
    seed = (run.seeds or {}).get("bootstrap", settings.EVALUATION_SEED)
    suites = all_suites()
    metrics = dict(base_metrics if base_metrics is not None else run.metrics or {})
    ei, deltas = _ei_metrics(run, suites["emotional_intelligence"], n_boot, seed)
    ei["agreement"] = _agreement(run, tuple(RUBRIC_SUITES), n_boot, seed)
    metrics["emotional_intelligence"] = ei
    metrics["brand_voice"] = _brand_metrics(run, suites["brand_voice"], n_boot, seed)

    responses = list(
        GeneratedResponse.objects.filter(run=run).only("suite", "item_id", "side", "stopped")
    )
    health = {
        side: stats.generation_health([r.stopped for r in responses if r.side == side])
        for side in Side.values
    }
    health["max_new_tokens"] = (run.decoding or {}).get("max_new_tokens")
    metrics["generation_health"] = health

    texts = {
        (r.item_id, r.side): r
        for r in GeneratedResponse.objects.filter(run=run, suite=Suite.EMOTIONAL_INTELLIGENCE)
    }
    pairs = []
    for item in suites["emotional_intelligence"].items:
        base, trained = (
            texts.get((item["id"], Side.BASELINE)),
            texts.get((item["id"], Side.TRAINED)),
        )
        if base and trained:
            pairs.append(
                {
                    "id": item["id"],
                    "category": item.get("category", ""),
                    "prompt": base.prompt,
                    "baseline": base.text,
                    "trained": trained.text,
                    "score_delta": round(deltas[item["id"]], 3) if item["id"] in deltas else None,
                }
            )
    examples = stats.select_examples(
        pairs, k=EXAMPLES_K, seed=(run.seeds or {}).get("examples", seed)
    )
    metrics["computed_at"] = timezone.now().isoformat()
    ValidationRun.objects.filter(pk=run.pk).update(
        metrics=metrics, examples=examples, updated_at=timezone.now()
    )
    run.metrics, run.examples = metrics, examples
    return metrics


# --- Reports -------------------------------------------------------------------------------


def latest_approval(run: ValidationRun) -> Approval | None:
    return Approval.objects.filter(job_id=run.job_id).select_related("decided_by").first()


def report_context(*, run: ValidationRun) -> dict:
    job = run.job
    approval = latest_approval(run)
    metrics = run.metrics or {}
    return {
        "title": f"Validation report: {job.name}",
        "generated_at": timezone.now(),
        "job": {
            "id": str(job.pk),
            "name": job.name,
            "base_model": job.base_model.display_name,
            "preset": job.preset.name if job.preset else "Custom",
            "configuration": job.configuration,
        },
        "run": {
            "id": str(run.pk),
            "evaluator_version": run.evaluator_version,
            "suites": {name: v["version"] for name, v in (run.suites or {}).items()},
            "suite_hashes": {name: v["sha256"] for name, v in (run.suites or {}).items()},
            "base_model": run.base_model,
            "adapter_uri": run.adapter_uri,
            "decoding": run.decoding,
            "seeds": run.seeds,
            "started_at": run.started_at,
            "completed_at": run.completed_at,
        },
        "metrics": {
            "perplexity": metrics.get("perplexity"),
            "retention": metrics.get("retention"),
            "emotional_intelligence": metrics.get("emotional_intelligence"),
            "brand_voice": metrics.get("brand_voice"),
            "generation_health": metrics.get("generation_health"),
        },
        "examples": run.examples or [],
        "approval": (
            {
                "status": approval.decision,
                "by": str(approval.decided_by or ""),
                "at": approval.decided_at,
                "reason": approval.reason,
            }
            if approval
            else None
        ),
    }


def validation_report_generate(
    *, run: ValidationRun, user: AbstractUser | None, allow_running: bool = False
) -> Report:
    """Recompute the figures from the stored scores and ratings, render the PDF, store it as
    a new report version (older versions stay)."""
    from evaluation.report import render_report_pdf

    if run.status != RunStatus.COMPLETED and not (
        allow_running and run.status == RunStatus.RUNNING
    ):
        raise Conflict(
            f"The validation is {run.get_status_display().lower()}; "
            "a report needs a completed run.",
            details={"status": run.status},
        )
    if not allow_running:
        validation_metrics_recompute(run=run)
    pdf = render_report_pdf(report_context(run=run))
    sha = hashlib.sha256(pdf).hexdigest()
    for _ in range(3):
        version = (Report.objects.filter(run=run).aggregate(m=Max("version"))["m"] or 0) + 1
        path = storage_save(f"evaluation/runs/{run.pk}/report-v{version}.pdf", pdf)
        try:
            with transaction.atomic():
                return Report.objects.create(
                    run=run,
                    version=version,
                    storage_path=path,
                    sha256=sha,
                    size_bytes=len(pdf),
                    metrics=_report_figures(run.metrics or {}),
                    created_by=user,
                )
        except IntegrityError:
            continue  # another request took this version number meanwhile
    raise Conflict("Reports are being generated concurrently; try again.")


def _report_figures(metrics: dict) -> dict:
    """The headline figures a report version shows (for the API and the audit)."""
    out = {}
    for part in ("perplexity", "retention", "emotional_intelligence", "brand_voice"):
        data = metrics.get(part) or {}
        out[part] = {
            k: data.get(k)
            for k in (
                "display",
                "baseline",
                "trained",
                "improvement_pct",
                "retention_pct",
                "baseline_mean",
                "trained_mean",
                "consistency_pct",
                "ci_low",
                "ci_high",
                "passed",
                "alert",
                "source",
            )
            if k in data
        }
    return out


def job_validation_report(*, job: TrainingJob) -> Report:
    """The newest report of the job's newest validation that has one."""
    report = (
        Report.objects.filter(run__job=job)
        .select_related("run")
        .order_by("-run__created_at", "-version")
        .first()
    )
    if report is None:
        raise NotFound("This job has no validation report yet.", details={"job_id": str(job.pk)})
    return report


# --- Blind rating --------------------------------------------------------------------------


def _rating_items(run: ValidationRun) -> list[tuple[str, str]]:
    both = defaultdict(set)
    for suite, item_id, side in GeneratedResponse.objects.filter(run=run).values_list(
        "suite", "item_id", "side"
    ):
        both[(suite, item_id)].add(side)
    return [key for key, sides in both.items() if len(sides) == 2]


def rating_progress(*, run: ValidationRun, rater: AbstractUser) -> dict:
    items = _rating_items(run)
    done = HumanRating.objects.filter(run=run, rater=rater).count()
    return {"done": done, "total": len(items), "remaining": max(0, len(items) - done)}


def rating_pair_next(
    *, run: ValidationRun, rater: AbstractUser, suite: str | None = None
) -> RatingPair | None:
    """The next item for this rater, with a random left/right assignment kept on the server.

    An assigned but unrated pair is shown again (reloading does not re-randomize). Items come
    in an order shuffled per rater, emotional intelligence first, then brand voice.
    """
    if run.status != RunStatus.COMPLETED:
        raise Conflict("Responses can be rated once the validation has completed.")
    if suite is not None and suite not in Suite.values:
        raise InvalidInput(f"Unknown suite '{suite}'.")
    pending = RatingPair.objects.filter(run=run, rater=rater, rating__isnull=True)
    if suite:
        pending = pending.filter(suite=suite)
    pair = pending.first()
    if pair is not None:
        return pair
    seen = set(RatingPair.objects.filter(run=run, rater=rater).values_list("suite", "item_id"))
    rng = random.Random(f"{run.pk}:{rater.pk}")
    for suite_name in RUBRIC_SUITES:
        if suite and suite_name != suite:
            continue
        items = sorted(i for s, i in _rating_items(run) if s == suite_name)
        rng.shuffle(items)
        for item_id in items:
            if (suite_name, item_id) in seen:
                continue
            try:
                with transaction.atomic():
                    return RatingPair.objects.create(
                        run=run,
                        rater=rater,
                        suite=suite_name,
                        item_id=item_id,
                        left_side=secrets.choice([Side.BASELINE, Side.TRAINED]),
                    )
            except IntegrityError:  # the same rater in two tabs
                return RatingPair.objects.get(
                    run=run, rater=rater, suite=suite_name, item_id=item_id
                )
    return None


def rating_pair_view(*, pair: RatingPair) -> dict:
    """What a rater may see: the prompt, "Response A"/"Response B" and the rubric. No sides."""
    from evaluation.suites import load_suite

    suite = load_suite(pair.suite)
    responses = {
        r.side: r
        for r in GeneratedResponse.objects.filter(
            run_id=pair.run_id, suite=pair.suite, item_id=pair.item_id
        )
    }
    left, right = responses[pair.left_side], responses[pair.right_side]
    return {
        "pair_id": str(pair.pk),
        "suite": pair.suite,
        "suite_name": Suite(pair.suite).label,
        "prompt": left.prompt,
        "context": suite.item(pair.item_id).get("context", ""),
        "left": left.text,
        "right": right.text,
        "dimensions": [
            {
                "key": d["key"],
                "name": d["name"],
                "description": d["description"],
                "anchors": d["anchors"],
            }
            for d in _dimensions(suite)
        ],
    }


def _clean_scores(scores: object, keys: list[str], label: str) -> dict[str, int]:
    if not isinstance(scores, dict):
        raise InvalidInput(f"{label} must be an object of scores.", details={"field": label})
    missing = [k for k in keys if k not in scores]
    unknown = [k for k in scores if k not in keys]
    if missing or unknown:
        raise InvalidInput(
            f"{label}: every criterion needs a score from 1 to 5"
            + (f" (missing: {', '.join(missing)})" if missing else "")
            + (f" (unknown: {', '.join(unknown)})" if unknown else ""),
            details={"field": label, "missing": missing, "unknown": unknown},
        )
    clean = {}
    for key in keys:
        value = scores[key]
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = None
        if number is None or str(number) != str(value).strip() or not 1 <= number <= 5:
            raise InvalidInput(
                f"{label}.{key} must be a whole number from 1 to 5 (got {value!r}).",
                details={"field": f"{label}.{key}"},
            )
        clean[key] = number
    return clean


def rating_submit(
    *,
    pair: RatingPair,
    rater: AbstractUser,
    left_scores: dict,
    right_scores: dict,
    comment: str = "",
) -> HumanRating:
    """Store one blind rating and map it back to the sides; figures update in the background."""
    from evaluation.suites import load_suite

    if pair.rater_id != rater.pk:
        raise PermissionDenied("This item was assigned to another rater.")
    keys = [d["key"] for d in _dimensions(load_suite(pair.suite))]
    left = _clean_scores(left_scores, keys, "left_scores")
    right = _clean_scores(right_scores, keys, "right_scores")
    if len(comment) > 2000:
        raise InvalidInput("The comment is limited to 2000 characters.")
    sides = {pair.left_side: left, pair.right_side: right}
    try:
        with transaction.atomic():
            rating = HumanRating.objects.create(
                pair=pair,
                rater=rater,
                run_id=pair.run_id,
                suite=pair.suite,
                item_id=pair.item_id,
                left_scores=left,
                right_scores=right,
                baseline_scores=sides[Side.BASELINE],
                trained_scores=sides[Side.TRAINED],
                comment=comment.strip(),
            )
            _enqueue_recompute(pair.run_id)
    except IntegrityError as exc:
        raise Conflict("This item has already been rated.") from exc
    return rating


def _enqueue_recompute(run_id) -> None:
    from evaluation.tasks import recompute_validation_metrics

    run_id = str(run_id)
    transaction.on_commit(lambda: recompute_validation_metrics.delay(run_id), robust=True)


# --- Share links ---------------------------------------------------------------------------


def share_link_create(*, report: Report, user: AbstractUser | None) -> ShareLink:
    return ShareLink.objects.create(report=report, created_by=user)


def share_link_revoke(*, link: ShareLink, user: AbstractUser | None) -> ShareLink:
    if link.revoked_at is None:
        ShareLink.objects.filter(pk=link.pk, revoked_at__isnull=True).update(
            revoked_at=timezone.now(), revoked_by=user
        )
        link.refresh_from_db()
    return link


def share_link_resolve(*, token: str) -> ShareLink:
    """The usable link for ``token``; NotFound (404) when unknown, expired or revoked."""
    link = (
        ShareLink.objects.usable()
        .select_related("report", "report__run", "report__run__job", "report__run__job__base_model")
        .filter(token=token)
        .first()
        if token
        else None
    )
    if link is None:
        raise NotFound("This link does not exist, has expired or was revoked.")
    return link


def share_link_used(*, link: ShareLink) -> None:
    from django.db.models import F

    ShareLink.objects.filter(pk=link.pk).update(
        download_count=F("download_count") + 1, last_used_at=timezone.now()
    )
    Report.objects.filter(pk=link.report_id).update(download_count=F("download_count") + 1)


# --- Approval ------------------------------------------------------------------------------


def approval_decide(
    *, run: ValidationRun, user: AbstractUser, decision: str, reason: str
) -> Approval:
    """Approve or reject the model validated by ``run``; every decision is kept, the latest wins."""
    reason = (reason or "").strip()
    if decision not in Approval.Decision.values:
        raise InvalidInput(
            f"The decision must be approved or rejected (got {decision!r}).",
            details={"field": "decision"},
        )
    if not reason:
        raise InvalidInput("A reason is required for the record.", details={"field": "reason"})
    if len(reason) > 2000:
        raise InvalidInput("The reason is limited to 2000 characters.", details={"field": "reason"})
    if run.status != RunStatus.COMPLETED:
        raise Conflict(
            "A model can be approved or rejected once its validation has completed.",
            details={"status": run.status},
        )
    return Approval.objects.create(
        run=run, job_id=run.job_id, decision=decision, reason=reason, decided_by=user
    )
