"""Training workflows: create, start, launch, follow events, recover, cancel, retry."""

from __future__ import annotations

import json
import logging
import random
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.db import IntegrityError, InterfaceError, OperationalError, transaction
from django.db.models import F, Q
from django.utils import timezone

from config import addresses
from config.errors import Conflict, ExternalServiceError, InvalidInput, NotAuthenticated
from config.storage import (
    storage_listdir,
    storage_path_from_uri,
    storage_size,
    storage_uri,
    storage_worker_settings,
)
from corpora.models import TrainingFile
from training import errors as training_errors
from training import hooks
from training.config import configuration_diff, resolve_configuration
from training.executors import ExecutorState, get_executor
from training.models import (
    RUNNING_STATUSES,
    TERMINAL_STATUSES,
    Artifact,
    BaseModel,
    Checkpoint,
    JobStatus,
    JobTemplate,
    JobTransition,
    MetricPoint,
    PlaygroundRun,
    Preset,
    Recovery,
    TrainingJob,
    TrainingPod,
    WebhookEvent,
)
from training.webhooks import refusal as webhook_refusal

logger = logging.getLogger("crucible.training")

S = JobStatus
_STAGES = {S.PREPROCESSING, S.MODEL_LOADING, S.TRAINING, S.FINALIZATION}
ALLOWED_TRANSITIONS: dict[str, set[str]] = {
    S.PENDING: {S.QUEUED, S.CANCELLED},
    S.QUEUED: {S.PROVISIONING, S.CANCELLED, S.FAILED},
    S.PROVISIONING: {*_STAGES, S.RECOVERING, S.COMPLETED, S.FAILED, S.CANCELLED},
    S.PREPROCESSING: {*_STAGES, S.RECOVERING, S.FAILED, S.CANCELLED},
    S.MODEL_LOADING: {*_STAGES, S.RECOVERING, S.FAILED, S.CANCELLED},
    S.TRAINING: {S.FINALIZATION, S.COMPLETED, S.RECOVERING, S.FAILED, S.CANCELLED},
    S.RECOVERING: {S.PROVISIONING, S.FAILED, S.CANCELLED},
    S.FINALIZATION: {S.COMPLETED, S.RECOVERING, S.FAILED, S.CANCELLED},
    S.COMPLETED: set(),
    S.FAILED: set(),
    S.CANCELLED: set(),
}


# --- State ------------------------------------------------------------------------------------


def _transition(job: TrainingJob, to: str, *, reason: str = "", **fields) -> TrainingJob:
    """Move ``job`` to ``to`` if that is allowed from the state it is in *now* in the database.

    The update is conditional on the current status, so two processes can't both move it.
    """
    current = job.status
    if to not in ALLOWED_TRANSITIONS[current]:
        raise Conflict(
            f"A {current} job cannot become {to}.",
            details={"status": current, "requested": to},
        )
    now = timezone.now()
    updates = {"status": to, "updated_at": now, **fields}
    if to in TERMINAL_STATUSES:
        updates.setdefault("completed_at", now)
        transaction.on_commit(lambda: hooks.announce_job_finished(job=job))
        if job.executor == TrainingJob.Executor.RUNPOD:
            transaction.on_commit(lambda: _enqueue_release(job))
    if TrainingJob.objects.filter(pk=job.pk, status=current).update(**updates) != 1:
        job.refresh_from_db()
        raise Conflict(
            f"The job changed to {job.status} meanwhile.", details={"status": job.status}
        )
    JobTransition.objects.create(job=job, from_status=current, to_status=to, reason=reason[:300])
    for key, value in updates.items():
        setattr(job, key, value)
    logger.info("job %s: %s -> %s %s", job.pk, current, to, reason)
    return job


# --- Create, start, cancel, delete, retry -------------------------------------------------------


def training_job_create(
    *,
    user: AbstractUser | None,
    training_file: TrainingFile,
    base_model: BaseModel,
    name: str,
    preset: Preset | None = None,
    overrides: dict | None = None,
    executor: str = TrainingJob.Executor.LOCAL,
    description: str = "",
    notes: str = "",
    tags: Iterable[str] = (),
    gpu_type: str = "",
    spot: bool = False,
) -> TrainingJob:
    if not training_file.is_ready:
        first = (training_file.validation_errors or [{}])[0]
        raise InvalidInput(
            f"Training file '{training_file.name}' has problems and cannot be trained on: "
            f"line {first.get('line')}: {first.get('message')}",
            details={
                "training_file": str(training_file.pk),
                "problems": training_file.validation_errors,
            },
        )
    if not base_model.is_active:
        raise InvalidInput(f"Base model {base_model.name} is not available.")
    if executor not in TrainingJob.Executor.values:
        raise InvalidInput(f"Unknown executor '{executor}'.")
    if preset is None:
        preset = Preset.objects.filter(is_default=True).first()
    configuration = resolve_configuration(
        preset_hyperparameters=preset.hyperparameters if preset else {},
        overrides=overrides,
        context_length=base_model.context_length,
    )
    clean_tags = sorted({t.strip().lower() for t in tags if t and t.strip()})
    job = TrainingJob.objects.create(
        name=name.strip() or f"{base_model.display_name} on {training_file.name}",
        description=description,
        notes=notes,
        tags=clean_tags,
        training_file=training_file,
        base_model=base_model,
        preset=preset,
        configuration=configuration,
        executor=executor,
        gpu_type=gpu_type,
        spot=spot,
        created_by=user,
    )
    estimate = hooks.estimate_for_job(job=job)
    if estimate is not None:
        TrainingJob.objects.filter(pk=job.pk).update(cost_estimate=estimate)
        job.cost_estimate = estimate
    return job


def training_job_start(
    *,
    job: TrainingJob,
    user: AbstractUser | None,
    enqueue: bool = True,
    override_reason: str = "",
) -> TrainingJob:
    with transaction.atomic():
        hooks.before_start(job=job, user=user, override_reason=override_reason)
        _transition(
            job, S.QUEUED, reason=f"started by {user or 'system'}", queued_at=timezone.now()
        )
        if enqueue:
            _enqueue_launch(job)
    return job


def training_job_cancel(*, job: TrainingJob, user: AbstractUser | None) -> TrainingJob:
    with transaction.atomic():
        if job.executor_ref and job.status in RUNNING_STATUSES:
            # SIGTERM: the worker saves a checkpoint and stops; reconcile kills it after a grace.
            get_executor(job.executor).cancel(ref=job.executor_ref)
        return _transition(
            job,
            S.CANCELLED,
            reason=f"cancelled by {user or 'system'}",
            cancel_requested_at=timezone.now(),
        )


def training_job_delete(*, job: TrainingJob, user: AbstractUser | None) -> None:
    if job.status != S.PENDING:
        raise Conflict(
            "Only a job that has not been started can be deleted.", details={"status": job.status}
        )
    job.delete()


def training_job_retry(
    *, job: TrainingJob, user: AbstractUser | None, start: bool = True
) -> TrainingJob:
    """A new job from the old configuration with the error's suggested changes applied."""
    if job.status not in (S.FAILED, S.CANCELLED):
        raise Conflict(
            "Only a failed or cancelled job can be retried.", details={"status": job.status}
        )
    changes = (job.error_details or {}).get("suggested_changes") or {}
    configuration = training_errors.apply_changes(job.configuration, changes)
    number = job.retries.count() + 1
    with transaction.atomic():
        retry = TrainingJob.objects.create(
            name=f"{job.name} (retry {number})",
            description=job.description,
            notes=job.notes,
            tags=job.tags,
            training_file=job.training_file,
            base_model=job.base_model,
            preset=job.preset,
            configuration=configuration,
            executor=job.executor,
            gpu_type=job.gpu_type,
            spot=job.spot,
            retry_of=job,
            retry_changes=configuration_diff(job.configuration, configuration),
            created_by=user,
        )
        if start:
            training_job_start(job=retry, user=user)
    return retry


# --- Launch and recovery ------------------------------------------------------------------------


def _enqueue_launch(job: TrainingJob) -> None:
    """Launch after the current transaction commits: through Celery, or in this process
    when TRAINING_LAUNCH_INLINE is set (the `train` command, which runs without a worker)."""
    job_id = str(job.pk)
    if settings.TRAINING_LAUNCH_INLINE:
        transaction.on_commit(lambda: training_job_launch(job_id=job_id))
        return
    from training.tasks import launch_training_job

    transaction.on_commit(lambda: launch_training_job.delay(job_id))


WEBHOOK_PATH = "api/v1/training/webhook"  # gpu/PROTOCOL.md section 4


def training_webhook_url(*, executor: str) -> str:
    """Where a worker of ``executor`` sends its events.

    ``CRUCIBLE_PUBLIC_URL`` wins when set. A local worker otherwise gets the newest address
    a web process of this installation answers on (probed; see config/addresses.py). The
    executors refuse an address their worker cannot use (local: nothing answers at it;
    RunPod: loopback or private) with a typed PlatformAddressError.
    """
    base = addresses.explicit_public_url()
    if not base and executor == TrainingJob.Executor.LOCAL:
        base = addresses.local_worker_base_url() or ""
    base = base or addresses.public_base_url()
    return f"{base}/{WEBHOOK_PATH}"


def job_output_path(job: TrainingJob) -> str:
    return f"training/jobs/{job.pk}"


def training_job_spec(*, job: TrainingJob) -> tuple[dict, dict]:
    """The worker's job spec (gpu/PROTOCOL.md) and the environment it needs."""
    storage_options, env = storage_worker_settings()
    base = job.base_model
    spec = {
        "spec_version": 1,
        "job_id": str(job.pk),
        "base_model": {
            "name": base.name,
            "source": base.source,
            "path": base.path or None,
            "revision": base.revision or None,
        },
        "training_file": {
            "uri": storage_uri(job.training_file.storage_path),
            "sha256": job.training_file.sha256,
        },
        "hyperparameters": job.configuration["hyperparameters"],
        "validation_split": job.configuration["validation_split"],
        "checkpoint_every_steps": job.configuration["checkpoint_every_steps"],
        "logging_steps": job.configuration["logging_steps"],
        "heartbeat_seconds": job.configuration["heartbeat_seconds"],
        "device": "auto",
        "output": {"uri": storage_uri(job_output_path(job)), **storage_options},
        "webhook": {
            "url": training_webhook_url(executor=job.executor),
            "secret": job.webhook_secret,
        },
        "resume": True,
    }
    if settings.HF_TOKEN and base.source == BaseModel.Source.HUB:
        env["HF_TOKEN"] = settings.HF_TOKEN
    if settings.TRAINING_MODEL_CACHE:
        env["CRUCIBLE_MODEL_CACHE"] = str(settings.TRAINING_MODEL_CACHE)
    return spec, env


def training_job_launch(*, job_id: str) -> TrainingJob | None:
    """Claim a queued (or recovering) job and start its worker. Safe to run twice."""
    with transaction.atomic():
        job = TrainingJob.objects.select_for_update().filter(pk=job_id).first()
        if job is None or job.status not in (S.QUEUED, S.RECOVERING):
            return None  # already launched, cancelled or gone
        recovering = job.status == S.RECOVERING
        _transition(
            job,
            S.PROVISIONING,
            reason="relaunching after interruption" if recovering else "launching",
        )
        # The previous instance's handle goes: its pod is released by the reconcile step.
        TrainingJob.objects.filter(pk=job.pk).update(
            attempt=F("attempt") + 1,
            output_uri=storage_uri(job_output_path(job)),
            executor_ref="",
            launch_waiting_since=None,
            launch_retry_at=None,
            launch_tries=0,
        )
        job.refresh_from_db()
    return _start_worker(job)


def training_job_launch_retry(*, job_id: str) -> TrainingJob | None:
    """Try again a launch the provider refused (no capacity, unreachable). Safe to run twice."""
    job = TrainingJob.objects.filter(pk=job_id).first()
    if job is None or not job.waiting_for_capacity or job.executor_ref:
        return None
    claimed = TrainingJob.objects.filter(
        pk=job.pk, status=S.PROVISIONING, executor_ref="", launch_retry_at=job.launch_retry_at
    ).update(launch_retry_at=None)
    if claimed != 1:
        return None
    job.refresh_from_db()
    return _start_worker(job)


def _start_worker(job: TrainingJob) -> TrainingJob:
    if job.executor == TrainingJob.Executor.RUNPOD and job.spot and not job.spot_for_next_launch:
        # Preempted RUNPOD_ON_DEMAND_AFTER_PREEMPTIONS times: on-demand from now on (billing
        # and the job page follow job.spot).
        TrainingJob.objects.filter(pk=job.pk).update(spot=False)
        _on_warning(
            job,
            {
                "code": "switched_to_on_demand",
                "message": f"Switched to on-demand instances after {job.recovery_count} spot "
                "interruptions.",
            },
        )
        job.refresh_from_db()
    spec, env = training_job_spec(job=job)
    executor = get_executor(job.executor)
    try:
        ref = executor.launch(job_id=str(job.pk), attempt=job.attempt, spec=spec, env=env)
    except training_errors.GPUProvisioningError as exc:
        details = {"gpu_type": exc.gpu_type, "spot": exc.spot, "suggestion": exc.suggestion}
        return _launch_later(job, exc.error_type, exc.message, details)
    except training_errors.PlatformAddressError as exc:
        # A worker that cannot report would train unseen and be "recovered" as if crashed.
        logger.warning("launch of job %s refused: %s", job.pk, exc.message)
        return _fail(job, exc.error_type, exc.message, {"url": exc.url})
    except ExternalServiceError as exc:
        if exc.transient:  # the provider's or the network's fault: not the job's
            return _launch_later(job, "NetworkError", exc.message, {"service": exc.service})
        logger.warning("launch of job %s refused: %s", job.pk, exc.message)
        return _fail(job, "WorkerError", f"The worker could not be started: {exc.message}", {})
    except Exception as exc:
        logger.exception("launch of job %s failed", job.pk)
        return _fail(job, "WorkerError", f"The worker could not be started: {exc}", {})
    now = timezone.now()
    updates = {
        "executor_ref": ref,
        "started_at": job.started_at or now,
        "last_heartbeat_at": now,
        "launch_waiting_since": None,
        "launch_retry_at": None,
        "launch_tries": 0,
    }
    if job.error_type in ("GPUProvisioningError", "NetworkError"):  # the launch's own wait
        updates |= {"error_type": "", "error_message": "", "error_details": {}}
    stored = (
        TrainingJob.objects.filter(pk=job.pk, executor_ref="")
        .exclude(status__in=TERMINAL_STATUSES)
        .update(**updates)
    )
    if stored != 1:
        # Cancelled (or failed) while the instance was being created: give it back.
        logger.info("job %s ended during its launch: releasing %s", job.pk, ref)
        executor.cancel(ref=ref, force=True)
        job.refresh_from_db()
        return job
    Recovery.objects.filter(job=job, relaunched_at__isnull=True).update(relaunched_at=now)
    job.refresh_from_db()
    return job


def _launch_later(job: TrainingJob, error_type: str, message: str, details: dict) -> TrainingJob:
    """No capacity or no answer: retry with exponential backoff and jitter for a bounded time
    (RUNPOD_LAUNCH_RETRY_WINDOW_S), then fail with the error and its suggestion."""
    now = timezone.now()
    job.refresh_from_db()
    since = job.launch_waiting_since or now
    window = timedelta(seconds=settings.RUNPOD_LAUNCH_RETRY_WINDOW_S)
    tries = job.launch_tries + 1
    if now - since >= window:
        waited = int((now - since).total_seconds())
        return _fail(
            job,
            error_type,
            f"{message} (tried {tries} times over {waited} s)",
            {**details, "tries": tries},
        )
    delay = min(
        settings.RUNPOD_LAUNCH_BACKOFF_MAX_S,
        settings.RUNPOD_LAUNCH_BACKOFF_S * 2 ** (tries - 1),
    ) * random.uniform(0.75, 1.25)  # jitter
    retry_at = min(now + timedelta(seconds=delay), since + window)
    classified = training_errors.classify(error_type, message, details, job.configuration)
    TrainingJob.objects.filter(pk=job.pk, status=S.PROVISIONING, executor_ref="").update(
        launch_waiting_since=since,
        launch_retry_at=retry_at,
        launch_tries=tries,
        error_type=classified.error_type,
        error_message=classified.message,
        error_details={
            **details,
            "title": classified.title,
            "fix": classified.fix,
            "suggested_changes": {},
            "retryable": True,
            "waiting": True,
            "tries": tries,
            "next_try_at": retry_at.isoformat(),
            "gives_up_at": (since + window).isoformat(),
        },
    )
    logger.info("job %s: %s; try %s again at %s", job.pk, message, tries + 1, retry_at)
    job.refresh_from_db()
    return job


def _enqueue_launch_retry(job: TrainingJob) -> None:
    job_id = str(job.pk)
    if settings.TRAINING_LAUNCH_INLINE:
        transaction.on_commit(lambda: training_job_launch_retry(job_id=job_id))
        return
    from training.tasks import retry_training_job_launch

    transaction.on_commit(lambda: retry_training_job_launch.delay(job_id))


def training_job_switch_to_on_demand(*, job: TrainingJob, user: AbstractUser | None) -> TrainingJob:
    """Run a spot job on on-demand instances from now on (seed: "switch to on-demand").

    Waiting for spot capacity: launched on-demand at once. Running: its next (re)launch is
    on-demand. Failed for lack of spot capacity: a new on-demand job from its configuration
    is started and returned.
    """
    if job.executor != TrainingJob.Executor.RUNPOD:
        raise Conflict(
            "Only RunPod jobs run on spot instances; this job runs on the local executor.",
            details={"executor": job.executor},
        )
    if job.status == S.FAILED and job.spot and job.error_type == "GPUProvisioningError":
        with transaction.atomic():
            retry = training_job_retry(job=job, user=user, start=False)
            TrainingJob.objects.filter(pk=retry.pk).update(spot=False)
            retry.refresh_from_db()
            training_job_start(job=retry, user=user)
        return retry
    if job.is_terminal:
        raise Conflict(
            f"A {job.status} job cannot switch to on-demand.", details={"status": job.status}
        )
    if not job.spot:
        raise Conflict("The job already runs on on-demand instances.", details={"spot": False})
    now = timezone.now()
    with transaction.atomic():
        updated = (
            TrainingJob.objects.filter(pk=job.pk, spot=True)
            .exclude(status__in=TERMINAL_STATUSES)
            .update(spot=False)
        )
        if updated != 1:
            job.refresh_from_db()
            raise Conflict(
                f"The job changed to {job.status} meanwhile.", details={"status": job.status}
            )
        job.refresh_from_db()
        _on_warning(
            job,
            {
                "code": "switched_to_on_demand",
                "message": f"Switched to on-demand instances by {user or 'system'}.",
            },
        )
        if job.waiting_for_capacity:
            # A fresh retry window for on-demand, starting now.
            TrainingJob.objects.filter(pk=job.pk).update(
                launch_retry_at=now, launch_waiting_since=None, launch_tries=0
            )
            job.refresh_from_db()
            _enqueue_launch_retry(job)
    job.refresh_from_db()
    return job


# --- Instances (RunPod pods) ----------------------------------------------------------------


def _enqueue_release(job: TrainingJob) -> None:
    """The job has ended: terminate all its pods."""
    job_id = str(job.pk)
    if settings.TRAINING_LAUNCH_INLINE:
        training_job_release_pods(job_id=job_id, ended=True)
        return
    from training.tasks import release_training_job_pods

    release_training_job_pods.delay(job_id, ended=True)


def _pod_still_needed(pod: TrainingPod, job: TrainingJob) -> bool:
    if job.is_terminal:
        return False
    if pod.pod_id == job.executor_ref:
        return True
    # Created by a launch that has not stored its handle yet.
    return not job.executor_ref and pod.attempt == job.attempt


def _release_pods(pods: Iterable[TrainingPod], *, ended: bool = False) -> list[str]:
    released = []
    for pod in pods:
        if not ended and _pod_still_needed(pod, pod.job):
            continue
        try:
            get_executor(pod.job.executor).release(ref=pod.pod_id)
        except Exception as exc:  # tried again at the next reconcile
            logger.warning("could not terminate pod %s of job %s: %s", pod.pod_id, pod.job_id, exc)
            continue
        released.append(pod.pod_id)
    return released


def training_job_release_pods(*, job_id: str, ended: bool = False) -> list[str]:
    """Terminate the job's pods it no longer needs; all of them when it has ``ended``."""
    return _release_pods(
        TrainingPod.objects.filter(job_id=job_id, terminated_at__isnull=True).select_related("job"),
        ended=ended,
    )


def runpod_pods_sweep() -> dict:
    """Terminate every pod of this installation that no active job owns (orphans: a launch
    whose answer was lost, a pod left by a crash). Pods of other installations or people on
    the same RunPod account (other name prefix) are never touched."""
    from training.executors.runpod import configured, parse_pod_name

    summary: dict = {"pods": 0, "terminated": [], "released": []}
    # Pods the platform knows about first (a stopped pod bills until terminated).
    summary["released"] = _release_pods(
        TrainingPod.objects.filter(terminated_at__isnull=True).select_related("job")
    )
    if not configured():
        return summary
    executor = get_executor(TrainingJob.Executor.RUNPOD)
    pods = executor.list_pods()
    summary["pods"] = len(pods)
    owned = set(
        TrainingJob.objects.active().exclude(executor_ref="").values_list("executor_ref", flat=True)
    )
    for pod in pods:
        parsed = parse_pod_name(pod.get("name") or "")
        if parsed is None or pod["id"] in owned:
            continue
        job_id, attempt = parsed
        job = TrainingJob.objects.filter(pk=job_id).first()
        if job is not None and job.is_active and not job.executor_ref and job.attempt == attempt:
            continue  # its launch is storing the handle right now
        executor.release(ref=pod["id"])
        logger.warning("terminated orphan pod %s (%s)", pod["id"], pod.get("name"))
        summary["terminated"].append(pod["id"])
    return summary


def _fail(
    job: TrainingJob, error_type: str, message: str, details: dict, traceback: str = ""
) -> TrainingJob:
    classified = training_errors.classify(error_type, message, details, job.configuration)
    error_details = {
        **details,
        "title": classified.title,
        "fix": classified.fix,
        "suggested_changes": classified.changes,
        "retryable": classified.retryable,
    }
    if traceback:
        error_details["traceback"] = traceback[-20000:]
    job.refresh_from_db()
    if job.is_terminal:
        return job
    return _transition(
        job,
        S.FAILED,
        reason=classified.error_type,
        error_type=classified.error_type,
        error_message=classified.message,
        error_details=error_details,
    )


def _recover(job: TrainingJob, *, reason: str) -> TrainingJob:
    if job.recovery_count >= settings.TRAINING_MAX_RECOVERIES:
        return _fail(
            job,
            "InterruptionLimitError",
            f"Interrupted {job.recovery_count + 1} times "
            f"(limit {settings.TRAINING_MAX_RECOVERIES}); last: {reason}.",
            {},
        )
    newest = job.checkpoints.order_by("-step").first()
    with transaction.atomic():
        _transition(job, S.RECOVERING, reason=reason, recovery_count=job.recovery_count + 1)
        Recovery.objects.create(
            job=job,
            reason=reason[:300],
            detected_at=timezone.now(),
            from_step=newest.step if newest else None,
        )
        _enqueue_launch(job)
    return job


def training_jobs_reconcile(
    *, now: datetime | None = None, job_ids: Iterable | None = None
) -> dict:
    """Compare every running job with its executor; recover interruptions, detect silence.

    ``job_ids`` limits the pass to those jobs (the ``train`` command watches only its own and
    leaves the rest, billing and the orphan pods to the scheduler's reconcile).
    """
    now = now or timezone.now()
    summary = {"checked": 0, "recovered": 0, "killed": 0, "undeliverable": 0}
    jobs = TrainingJob.objects.all()
    if job_ids is not None:
        jobs = jobs.filter(pk__in=[str(i) for i in job_ids])
    else:
        hooks.accrue(now=now)
    grace = timedelta(seconds=settings.TRAINING_CANCEL_GRACE_S)
    # Cancelled jobs whose worker ignores SIGTERM get killed after the grace period.
    for job in (
        jobs.filter(status=S.CANCELLED, cancel_requested_at__lt=now - grace)
        .exclude(executor_ref="")
        .exclude(executor=TrainingJob.Executor.RUNPOD)  # terminated by the pod release below
    ):
        executor = get_executor(job.executor)
        if executor.status(ref=job.executor_ref).alive:
            executor.cancel(ref=job.executor_ref, force=True)
            summary["killed"] += 1
    heartbeat_timeout = timedelta(seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_S)
    running = jobs.filter(status__in=RUNNING_STATUSES).exclude(executor_ref="")
    for job in running.exclude(status=S.RECOVERING):
        summary["checked"] += 1
        executor = get_executor(job.executor)
        status = executor.status(ref=job.executor_ref)
        if status.state == ExecutorState.UNKNOWN:
            continue  # the provider's fault, not the job's: ask again next time
        if not status.alive:
            job.refresh_from_db()
            if job.is_terminal or job.status == S.RECOVERING:
                continue
            code = status.exit_code
            fallback = {
                2: "DatasetFormatError",
                3: "OutOfMemoryError",
                4: "ModelAccessError",
                5: "NaNLossError",
            }
            if code in fallback:
                _fail(
                    job, fallback[code], f"The worker exited with code {code} before reporting.", {}
                )
                continue
            # Exited without one event ever arriving: its address was wrong from the start.
            problem = _delivery_problem(executor, job) if job.last_event_at is None else ""
            if problem:
                _fail_undeliverable(job, problem)
                summary["undeliverable"] += 1
                continue
            _recover(
                job,
                reason=f"worker {status.state.value} without a completed or error event "
                f"(exit code {code})",
            )
            summary["recovered"] += 1
        elif job.last_heartbeat_at and now - job.last_heartbeat_at > heartbeat_timeout:
            executor.cancel(ref=job.executor_ref, force=True)
            problem = _delivery_problem(executor, job)
            if problem:
                # Alive and working, but unheard: a wrong address, not a crash. Relaunching
                # it with the same address would only repeat this.
                _fail_undeliverable(job, problem)
                summary["undeliverable"] += 1
                continue
            _recover(
                job,
                reason=f"no heartbeat for {int((now - job.last_heartbeat_at).total_seconds())} s",
            )
            summary["recovered"] += 1
    # A job waiting for its launch longer than TRAINING_LAUNCH_REQUEUE_S lost its launch
    # message (the broker restarted without persistence, or was flushed): enqueue it again.
    # The launch claims the job once, so a message that was only slow does no harm. The
    # wall clock, not ``now``: a message is lost in real time.
    lost_before = timezone.now() - timedelta(seconds=settings.TRAINING_LAUNCH_REQUEUE_S)
    summary["launches_requeued"] = 0
    for job in jobs.filter(
        status__in=(S.QUEUED, S.RECOVERING), executor_ref="", updated_at__lt=lost_before
    ):
        if TrainingJob.objects.filter(
            pk=job.pk, status=job.status, updated_at=job.updated_at
        ).update(updated_at=timezone.now()):
            logger.warning("job %s waited %s for its launch: enqueued again", job.pk, job.status)
            _enqueue_launch(job)
            summary["launches_requeued"] += 1
    # A launch whose process died between claiming the job and storing the handle: try again
    # (a pod it may have created has no owner and is terminated by the orphan sweep).
    jobs.filter(
        status=S.PROVISIONING,
        executor_ref="",
        launch_retry_at__isnull=True,
        updated_at__lt=now - timedelta(seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_S),
    ).update(launch_retry_at=now)
    summary["launch_retries"] = 0
    for job in jobs.filter(status=S.PROVISIONING, executor_ref="", launch_retry_at__lte=now):
        _enqueue_launch_retry(job)
        summary["launch_retries"] += 1
    # Pods of ended jobs and of earlier attempts (a preempted spot pod stays "stopped" and
    # bills for its storage until terminated).
    pods = TrainingPod.objects.filter(terminated_at__isnull=True)
    if job_ids is not None:
        pods = pods.filter(job__in=jobs)
    summary["pods_released"] = len(_release_pods(pods.select_related("job")))
    return summary


def _delivery_problem(executor, job: TrainingJob) -> str:
    """What the executor knows about the worker's webhooks failing ("" when nothing)."""
    check = getattr(executor, "delivery_problem", None)
    if check is None:
        return ""
    try:
        return check(job_id=str(job.pk), attempt=job.attempt) or ""
    except Exception as exc:  # a diagnosis must never stop the reconcile
        logger.warning("could not check webhook delivery of job %s: %s", job.pk, exc)
        return ""


def _fail_undeliverable(job: TrainingJob, problem: str) -> TrainingJob:
    return _fail(
        job,
        "WebhookDeliveryError",
        f"The worker ran, but its reports could not be delivered: {problem}. "
        "It was stopped instead of being restarted with the same address.",
        {"problem": problem},
    )


# --- Webhook events --------------------------------------------------------------------------


def training_event_receive(
    *, body: bytes, timestamp: str, signature: str, event_id_header: str = ""
) -> tuple[WebhookEvent, bool]:
    """Verify, store and process one worker event. Returns (event, created).

    A bad or stale signature raises NotAuthenticated and writes nothing; an event ID seen
    before is acknowledged and not processed again.
    """
    try:
        payload = json.loads(body)
        job_id = payload["job_id"]
        event_id = payload["event_id"]
        event_type = payload["type"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput("The event body must be JSON with job_id, event_id and type.") from exc
    job = TrainingJob.objects.filter(pk=job_id).first() if _is_uuid(job_id) else None
    problem = webhook_refusal(
        secret=job.webhook_secret if job else None,
        timestamp=timestamp,
        body=body,
        signature=signature,
    )
    if problem:
        raise NotAuthenticated(problem, code="bad_signature")
    if event_id_header and event_id_header != event_id:
        raise InvalidInput("X-Crucible-Event-Id does not match the body's event_id.")
    try:
        with transaction.atomic():
            event = WebhookEvent.objects.create(
                event_id=event_id,
                job=job,
                type=str(event_type)[:32],
                sequence=payload.get("sequence"),
                payload=payload,
            )
    except IntegrityError:
        event = WebhookEvent.objects.get(event_id=event_id)
        # Stored, but the database went away before it was processed (the worker got a 5xx
        # and sent it again): process it now, or it would be acknowledged and never applied.
        training_event_process(event=event)
        return event, False
    training_event_process(event=event)
    return event, True


def _is_uuid(value) -> bool:
    try:
        uuid.UUID(str(value))
        return True
    except ValueError:
        return False


def training_event_process(*, event: WebhookEvent) -> None:
    if event.processed:
        return
    handler = _HANDLERS.get(event.type)
    error = ""
    try:
        with transaction.atomic():
            job = TrainingJob.objects.select_for_update().get(pk=event.job_id)
            # A resend of this event may be processing it too: the job's lock orders them.
            if WebhookEvent.objects.filter(pk=event.pk, processed=True).exists():
                return
            now = timezone.now()
            TrainingJob.objects.filter(pk=job.pk).update(last_event_at=now, last_heartbeat_at=now)
            if handler is not None:
                handler(job, event.payload.get("data") or {})
            WebhookEvent.objects.filter(pk=event.pk).update(processed=True, processed_at=now)
        return
    except Conflict as exc:
        error = exc.message  # e.g. a late stage event for a finished job: kept, not applied
    except (OperationalError, InterfaceError):
        # The database is unreachable: the event stays unprocessed and the request fails
        # (5xx), so the worker resends it and the resend processes it (above).
        raise
    except Exception as exc:
        logger.exception("processing event %s failed", event.event_id)
        error = f"{type(exc).__name__}: {exc}"
    WebhookEvent.objects.filter(pk=event.pk).update(
        processed=True, processed_at=timezone.now(), processing_error=error[:2000]
    )


def _on_started(job: TrainingJob, data: dict) -> None:
    if job.status == S.QUEUED:
        _transition(job, S.PROVISIONING, reason="worker started")


def _on_stage(job: TrainingJob, data: dict) -> None:
    stage = data.get("stage")
    if stage not in _STAGES or job.status == stage:
        return
    _transition(job, stage, reason="worker stage")


def _on_dataset(job: TrainingJob, data: dict) -> None:
    TrainingJob.objects.filter(pk=job.pk).update(
        dataset_report=data, total_steps=data.get("total_steps") or job.total_steps
    )


def _on_metrics(job: TrainingJob, data: dict) -> None:
    step = int(data.get("step") or 0)
    values = {k: data.get(k) for k in MetricPoint.VALUE_FIELDS if data.get(k) is not None}
    point, created = MetricPoint.objects.get_or_create(job=job, step=step, defaults=values)
    if not created and values:
        MetricPoint.objects.filter(pk=point.pk).update(**values)
    total = data.get("total_steps") or job.total_steps
    latest = {**job.latest_metrics, **values, "step": step}
    if values.get("val_loss") is not None:
        latest["val_loss_step"] = step  # the validation loss is labelled with its own step
    updates = {"latest_metrics": latest}
    if step >= job.current_step:
        updates |= {
            "current_step": step,
            "current_epoch": data.get("epoch", job.current_epoch),
            "eta_seconds": data.get("eta_seconds"),
        }
    if total:
        updates |= {
            "total_steps": total,
            "progress": round(min(100.0, 100.0 * max(step, job.current_step) / total), 2),
        }
    TrainingJob.objects.filter(pk=job.pk).update(**updates)


def _on_checkpoint(job: TrainingJob, data: dict) -> None:
    Checkpoint.objects.get_or_create(
        job=job,
        step=int(data["step"]),
        defaults={
            "uri": data.get("uri", ""),
            "manifest_uri": data.get("manifest_uri", ""),
            "size_bytes": data.get("size_bytes") or 0,
        },
    )


def _on_resume_check(job: TrainingJob, data: dict) -> None:
    TrainingJob.objects.filter(pk=job.pk).update(resume_check=data)
    if not data.get("passed"):
        _on_warning(job, {"code": "resume_check_failed", "message": data.get("message", "")})


def _on_warning(job: TrainingJob, data: dict) -> None:
    job.refresh_from_db(fields=["warnings"])
    warnings = [*job.warnings, {**data, "at": timezone.now().isoformat()}][-50:]
    TrainingJob.objects.filter(pk=job.pk).update(warnings=warnings)


def _on_error(job: TrainingJob, data: dict) -> None:
    if job.is_terminal:
        return
    _fail(
        job,
        data.get("error_type", "WorkerError"),
        data.get("message", ""),
        data.get("details") or {},
        data.get("traceback", ""),
    )


def _on_stopped(job: TrainingJob, data: dict) -> None:
    if not job.is_terminal and job.cancel_requested_at:
        _transition(job, S.CANCELLED, reason="worker stopped after cancel")


def _storage_tree_size(path: str) -> int:
    """Bytes under ``path``: one file's size, or every file's below a folder (the adapter)."""
    folders, files = storage_listdir(path)
    if not folders and not files:
        return storage_size(path)
    total = sum(storage_size(f"{path}/{name}") for name in files)
    return total + sum(_storage_tree_size(f"{path}/{name}") for name in folders)


def _artifact(job: TrainingJob, kind: str, uri: str | None) -> None:
    if not uri:
        return
    path = storage_path_from_uri(uri)
    try:
        size = _storage_tree_size(path) if kind == Artifact.Kind.ADAPTER else storage_size(path)
    except (OSError, NotImplementedError):
        logger.warning("could not measure artifact %s of job %s", path, job.pk)
        size = 0
    Artifact.objects.update_or_create(
        job=job, kind=kind, defaults={"storage_path": path, "size_bytes": size}
    )


def _on_completed(job: TrainingJob, data: dict) -> None:
    artifacts = data.get("artifacts") or {}
    _artifact(job, Artifact.Kind.ADAPTER, artifacts.get("adapter_uri"))
    _artifact(job, Artifact.Kind.METRICS_JSON, artifacts.get("metrics_json_uri"))
    _artifact(job, Artifact.Kind.METRICS_CSV, artifacts.get("metrics_csv_uri"))
    _artifact(job, Artifact.Kind.CONFIG, artifacts.get("config_uri"))
    final = dict(data.get("final_metrics") or {})
    ppl = data.get("perplexity") or {}
    step = final.get("global_step") or job.current_step
    val_loss, val_step = training_job_validation_loss(job=job, final=final)
    final |= {"val_loss": val_loss, "val_loss_step": val_step}
    latest = {**job.latest_metrics, "perplexity": ppl, "final": final}
    if val_loss is not None:
        latest |= {"val_loss": val_loss, "val_loss_step": val_step}
    fields = {
        "final_train_loss": final.get("train_loss"),
        "final_val_loss": val_loss,
        "perplexity_baseline": ppl.get("baseline"),
        "perplexity_trained": ppl.get("trained"),
        "current_step": step,
        "progress": 100.0,
        "eta_seconds": 0,
        "latest_metrics": latest,
    }
    if job.status == S.CANCELLED:
        return
    if job.status in (S.PROVISIONING, S.PREPROCESSING, S.MODEL_LOADING):
        _transition(job, S.TRAINING, reason="worker completed")
    if job.status == S.TRAINING:
        _transition(job, S.FINALIZATION, reason="worker completed")
    _transition(job, S.COMPLETED, reason="worker completed", **fields)
    hooks.announce_job_completed(job=job)  # evaluation: the automatic validation


def training_job_validation_loss(
    *, job: TrainingJob, final: dict | None = None
) -> tuple[float | None, int | None]:
    """The job's validation loss and the step it was measured at: the last evaluation on the
    held-out split (the chart's last point). One definition for the results, the metrics card,
    the compare page and the API; the worker's own final value only when no point has one."""
    point = (
        MetricPoint.objects.filter(job=job, val_loss__isnull=False)
        .order_by("-step")
        .values_list("val_loss", "step")
        .first()
    )
    if point is not None:
        return point[0], point[1]
    final = final or {}
    if final.get("val_loss") is None:
        return None, None
    return final["val_loss"], final.get("val_loss_step") or final.get("global_step")


def _on_heartbeat(job: TrainingJob, data: dict) -> None:
    """Liveness is recorded for every event; nothing more to do."""


_HANDLERS = {
    "started": _on_started,
    "stage": _on_stage,
    "dataset": _on_dataset,
    "metrics": _on_metrics,
    "checkpoint": _on_checkpoint,
    "resume_check": _on_resume_check,
    "heartbeat": _on_heartbeat,
    "warning": _on_warning,
    "error": _on_error,
    "stopped": _on_stopped,
    "completed": _on_completed,
}


# --- Templates and playground ---------------------------------------------------------------
# Job templates (save a job's configuration, start a job from it), the compare data of 2-4
# jobs, and playground runs (a prompt answered by the base model and an adapter).

COMPARE_MIN_JOBS = 2
COMPARE_MAX_JOBS = 4
COMPARE_MAX_POINTS = 1000  # per job and series, for the overlaid chart


def _flat_configuration(configuration: dict) -> dict:
    return {
        **(configuration or {}).get("hyperparameters", {}),
        **{k: v for k, v in (configuration or {}).items() if k != "hyperparameters"},
    }


def _clean_tags(tags: Iterable[str]) -> list[str]:
    return sorted({t.strip().lower()[:50] for t in tags if t and t.strip()})


def _template_name(name: str) -> str:
    clean = (name or "").strip()
    if not clean:
        raise InvalidInput(
            "Give the template a name.",
            details={"fields": [{"field": "name", "message": "required"}]},
        )
    if len(clean) > 200:
        raise InvalidInput(
            "A template name has at most 200 characters.",
            details={"fields": [{"field": "name", "message": "too long"}]},
        )
    if JobTemplate.objects.filter(name__iexact=clean).exists():
        raise Conflict(
            f"A template named '{clean}' exists already; pick another name.",
            details={"fields": [{"field": "name", "message": "taken"}]},
        )
    return clean


def job_template_create(
    *,
    user: AbstractUser | None,
    name: str,
    base_model: BaseModel,
    preset: Preset | None = None,
    overrides: dict | None = None,
    training_file: TrainingFile | None = None,
    description: str = "",
    notes: str = "",
    tags: Iterable[str] = (),
    executor: str = TrainingJob.Executor.LOCAL,
    gpu_type: str = "",
    spot: bool = False,
    source_job: TrainingJob | None = None,
) -> JobTemplate:
    """A template anyone on the team can start jobs from; the configuration is validated
    now, so starting from it later fails only on the file or the budget."""
    clean_name = _template_name(name)
    if executor not in TrainingJob.Executor.values:
        raise InvalidInput(
            f"Unknown executor '{executor}'.",
            details={"fields": [{"field": "executor", "message": "unknown"}]},
        )
    if not base_model.is_active:
        raise InvalidInput(f"Base model {base_model.name} is not available.")
    resolve_configuration(
        preset_hyperparameters=preset.hyperparameters if preset else {},
        overrides=overrides,
        context_length=base_model.context_length,
    )
    try:
        with transaction.atomic():
            return JobTemplate.objects.create(
                name=clean_name,
                description=description.strip(),
                base_model=base_model,
                preset=preset,
                overrides=dict(overrides or {}),
                training_file=training_file,
                notes=notes.strip(),
                tags=_clean_tags(tags),
                executor=executor,
                gpu_type=gpu_type,
                spot=spot,
                source_job=source_job,
                created_by=user,
            )
    except IntegrityError as exc:  # two saves with one name at once
        raise Conflict(f"A template named '{clean_name}' exists already.") from exc


def job_template_from_job(
    *,
    job: TrainingJob,
    user: AbstractUser | None,
    name: str,
    description: str = "",
    include_training_file: bool = True,
) -> JobTemplate:
    """Save a job's exact configuration (hyperparameters and run settings) as a template."""
    if job.status in (S.FAILED, S.CANCELLED):
        raise Conflict(
            f"Only a job that did not fail can be saved as a template (this one is {job.status}).",
            details={"status": job.status},
        )
    preset = job.preset
    flat = _flat_configuration(job.configuration)
    overrides = flat
    if preset is not None:
        # Keep only what differs from the preset (resolved with the defaults), so the
        # template reads as "preset + changes".
        base = _flat_configuration(
            resolve_configuration(
                preset_hyperparameters=preset.hyperparameters,
                overrides=None,
                context_length=job.base_model.context_length,
            )
        )
        overrides = {k: v for k, v in flat.items() if base.get(k, object()) != v}
    return job_template_create(
        user=user,
        name=name,
        base_model=job.base_model,
        preset=preset,
        overrides=overrides,
        training_file=job.training_file if include_training_file else None,
        description=description,
        notes=job.notes,
        tags=job.tags,
        executor=job.executor,
        gpu_type=job.gpu_type,
        spot=job.spot,
        source_job=job,
    )


def job_template_update(
    *, template: JobTemplate, user: AbstractUser | None, **changes
) -> JobTemplate:
    """Change a template's name, description, notes, tags or training file."""
    allowed = {"name", "description", "notes", "tags", "training_file"}
    unknown = set(changes) - allowed
    if unknown:
        raise InvalidInput(f"These fields cannot be changed: {', '.join(sorted(unknown))}.")
    if "name" in changes and changes["name"].strip().lower() != template.name.lower():
        changes["name"] = _template_name(changes["name"])
    elif "name" in changes:
        changes["name"] = changes["name"].strip()
    if "tags" in changes:
        changes["tags"] = _clean_tags(changes["tags"])
    for key, value in changes.items():
        setattr(template, key, value)
    template.save(update_fields=list(changes))
    return template


def job_template_delete(*, template: JobTemplate, user: AbstractUser | None) -> None:
    template.delete()


def job_template_default_file(*, template: JobTemplate) -> TrainingFile | None:
    """The file a start preselects: the template's own when it is ready, else the newest
    ready file."""
    if template.training_file_id and template.training_file.is_ready:
        return template.training_file
    return TrainingFile.objects.ready().order_by("-created_at").first()


def job_template_start(
    *,
    template: JobTemplate,
    user: AbstractUser | None,
    training_file: TrainingFile | None = None,
    name: str = "",
    start: bool = True,
    override_reason: str = "",
) -> TrainingJob:
    """Create (and start) a job from a template. Nothing is written when it cannot start."""
    training_file = training_file or template.training_file
    if training_file is None:
        raise InvalidInput(
            "Choose a training file to start this template on.",
            details={"fields": [{"field": "training_file_id", "message": "required"}]},
        )
    label = timezone.localtime().strftime("%Y-%m-%d %H:%M")
    with transaction.atomic():
        job = training_job_create(
            user=user,
            training_file=training_file,
            base_model=template.base_model,
            preset=template.preset,
            overrides=template.overrides,
            name=(name or "").strip()[:255] or f"{template.name} · {label}",
            description=template.description,
            notes=template.notes,
            tags=template.tags,
            executor=template.executor,
            gpu_type=template.gpu_type,
            spot=template.spot,
        )
        if start:
            training_job_start(job=job, user=user, override_reason=override_reason)
        JobTemplate.objects.filter(pk=template.pk).update(
            use_count=F("use_count") + 1, last_used_at=timezone.now()
        )
    return job


# Compare: (key, label, lower_is_better or None when there is no "best")
COMPARE_METRICS = [
    ("final_train_loss", "Final train loss", True),
    ("final_val_loss", "Validation loss (last evaluation)", True),
    ("perplexity_baseline", "Perplexity before", None),
    ("perplexity_trained", "Perplexity after", True),
    ("perplexity_improvement_pct", "Perplexity improvement (%)", False),
    ("cost", "Cost (USD)", True),
    ("duration_seconds", "Duration (s)", True),
    ("steps", "Steps", None),
]


def _job_duration(job: TrainingJob) -> float | None:
    if job.started_at is None or job.completed_at is None:
        return None
    return round((job.completed_at - job.started_at).total_seconds(), 1)


def _best_indexes(values: list, lower_is_better: bool | None) -> set[int]:
    present = [(i, v) for i, v in enumerate(values) if v is not None]
    if lower_is_better is None or len(present) < 2 or len({v for _, v in present}) < 2:
        return set()
    best = min(v for _, v in present) if lower_is_better else max(v for _, v in present)
    return {i for i, v in present if v == best}


def _thin(points: list[list], limit: int) -> list[list]:
    if len(points) <= limit:
        return points
    stride = -(-len(points) // limit)
    last = len(points) - 1
    return [p for i, p in enumerate(points) if i % stride == 0 or i == last]


def training_jobs_compare(*, job_ids: Iterable) -> dict:
    """2-4 jobs side by side: loss series for one chart, metrics with the best of each
    marked, and every hyperparameter (rows that differ are flagged). Three queries."""
    ids = list(dict.fromkeys(str(i) for i in job_ids))
    if not COMPARE_MIN_JOBS <= len(ids) <= COMPARE_MAX_JOBS:
        raise InvalidInput(
            f"Pick {COMPARE_MIN_JOBS} to {COMPARE_MAX_JOBS} different jobs to compare "
            f"({len(ids)} given).",
            details={"fields": [{"field": "jobs", "message": "2 to 4 job ids"}]},
        )
    try:
        uuids = [uuid.UUID(i) for i in ids]
    except ValueError as exc:
        raise InvalidInput(
            "A job id is not valid.", details={"fields": [{"field": "jobs", "message": str(exc)}]}
        ) from exc
    found = {j.pk: j for j in TrainingJob.objects.for_list().filter(pk__in=uuids)}
    missing = [str(u) for u in uuids if u not in found]
    if missing:
        raise InvalidInput(
            f"No training job {', '.join(missing)}.",
            details={"fields": [{"field": "jobs", "message": "not found"}], "missing": missing},
        )
    jobs = [found[u] for u in uuids]
    series: dict = {j.pk: {"train": [], "val": []} for j in jobs}
    rows = (
        MetricPoint.objects.filter(job_id__in=uuids)
        .filter(Q(train_loss__isnull=False) | Q(val_loss__isnull=False))
        .order_by("job_id", "step")
        .values_list("job_id", "step", "train_loss", "val_loss")
    )
    for job_id, step, train, val in rows.iterator(chunk_size=5000):
        if train is not None:
            series[job_id]["train"].append([step, train])
        if val is not None:
            series[job_id]["val"].append([step, val])

    values_by_job = []
    for job in jobs:
        values_by_job.append(
            {
                "final_train_loss": job.final_train_loss,
                "final_val_loss": job.final_val_loss,
                "perplexity_baseline": job.perplexity_baseline,
                "perplexity_trained": job.perplexity_trained,
                "perplexity_improvement_pct": job.perplexity_improvement_pct,
                "cost": float(job.cost_actual) if job.cost_actual is not None else None,
                "duration_seconds": _job_duration(job),
                "steps": job.current_step or None,
            }
        )
    metrics = []
    for key, label, lower in COMPARE_METRICS:
        values = [v[key] for v in values_by_job]
        best = _best_indexes(values, lower)
        metrics.append(
            {
                "key": key,
                "label": label,
                "lower_is_better": lower,
                "values": values,
                "best": [i in best for i in range(len(jobs))],
            }
        )
    flats = [_flat_configuration(j.configuration) for j in jobs]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    hyperparameters = [
        {
            "key": key,
            "values": [flat.get(key) for flat in flats],
            "differs": len({json.dumps(flat.get(key), sort_keys=True) for flat in flats}) > 1,
        }
        for key in keys
    ]
    return {
        "jobs": [
            {
                "id": str(j.pk),
                "name": j.name,
                "status": j.status,
                "preset": j.preset.key if j.preset else None,
                "base_model": j.base_model.name,
                "training_file": j.training_file.name,
                "created_at": j.created_at.isoformat(),
                "train_loss": _thin(series[j.pk]["train"], COMPARE_MAX_POINTS),
                "val_loss": _thin(series[j.pk]["val"], COMPARE_MAX_POINTS),
            }
            for j in jobs
        ],
        "metrics": metrics,
        "hyperparameters": hyperparameters,
    }


def training_jobs_compare_csv(*, comparison: dict) -> str:
    """The comparison as CSV: one row per metric or setting, one column per job."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    jobs = comparison["jobs"]
    writer.writerow(["field", *[j["name"] for j in jobs], "best"])
    writer.writerow(["job_id", *[j["id"] for j in jobs], ""])
    for key in ("status", "preset", "base_model", "training_file"):
        writer.writerow([key, *[j[key] or "" for j in jobs], ""])
    for metric in comparison["metrics"]:
        best = [jobs[i]["name"] for i, flag in enumerate(metric["best"]) if flag]
        writer.writerow(
            [
                metric["key"],
                *["" if v is None else v for v in metric["values"]],
                "; ".join(best),
            ]
        )
    for hp in comparison["hyperparameters"]:
        writer.writerow(
            [
                hp["key"],
                *[
                    "" if v is None else (json.dumps(v) if isinstance(v, list | dict) else v)
                    for v in hp["values"]
                ],
                "",
            ]
        )
    return out.getvalue()


def playground_run_create(
    *,
    job: TrainingJob,
    user: AbstractUser | None,
    prompt: str,
    system_prompt: str = "",
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.1,
    seed: int = 42,
    enqueue: bool = True,
) -> PlaygroundRun:
    """Queue a prompt for the base model and the job's adapter (a Celery task runs it)."""
    from training import playground

    limit = getattr(settings, "PLAYGROUND_MAX_NEW_TOKENS_LIMIT", playground.MAX_NEW_TOKENS_LIMIT)
    default = getattr(settings, "PLAYGROUND_MAX_NEW_TOKENS", playground.DEFAULT_MAX_NEW_TOKENS)
    max_new_tokens = default if max_new_tokens is None else max_new_tokens
    problems = []
    prompt = (prompt or "").strip()
    if not prompt:
        problems.append({"field": "prompt", "message": "Type a prompt."})
    elif len(prompt) > playground.MAX_PROMPT_CHARS:
        problems.append(
            {
                "field": "prompt",
                "message": f"At most {playground.MAX_PROMPT_CHARS} characters "
                f"({len(prompt)} given).",
            }
        )
    if len(system_prompt or "") > playground.MAX_PROMPT_CHARS:
        problems.append(
            {
                "field": "system_prompt",
                "message": f"At most {playground.MAX_PROMPT_CHARS} characters.",
            }
        )
    if not 1 <= max_new_tokens <= limit:
        problems.append({"field": "max_new_tokens", "message": f"Between 1 and {limit}."})
    if not 0 <= temperature <= 2:
        problems.append({"field": "temperature", "message": "Between 0 and 2."})
    if not 0 < top_p <= 1:
        problems.append({"field": "top_p", "message": "Above 0 and at most 1."})
    if not 1 <= repetition_penalty <= 2:
        problems.append({"field": "repetition_penalty", "message": "Between 1 and 2."})
    if not 0 <= seed <= 2**31 - 1:
        problems.append({"field": "seed", "message": "Between 0 and 2147483647."})
    if problems:
        raise InvalidInput(
            "; ".join(f"{p['field']}: {p['message']}" for p in problems),
            details={"fields": problems},
        )
    if job.status != S.COMPLETED or not job.artifacts.filter(kind=Artifact.Kind.ADAPTER).exists():
        raise Conflict(
            "The playground needs a completed job with an adapter "
            f"('{job.name}' is {job.get_status_display().lower()}).",
            details={"status": job.status},
        )
    decoding = playground.Decoding(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    with transaction.atomic():
        run = PlaygroundRun.objects.create(
            job=job,
            prompt=prompt,
            system_prompt=(system_prompt or "").strip(),
            decoding=decoding.as_dict(),
            stage="Waiting for a worker",
            created_by=user,
        )
        if enqueue:
            run_id = str(run.pk)
            from training.tasks import run_playground

            transaction.on_commit(lambda: run_playground.delay(run_id))
    return run


PLAYGROUND_STALE_AFTER = timedelta(minutes=15)


def playground_run_execute(*, run_id: str) -> PlaygroundRun | None:
    """Claim a queued run (or one whose worker died) and generate. Safe to run twice."""
    from training import playground

    now = timezone.now()
    claimable = Q(status=PlaygroundRun.Status.QUEUED) | Q(
        status=PlaygroundRun.Status.RUNNING, started_at__lt=now - PLAYGROUND_STALE_AFTER
    )
    claimed = (
        PlaygroundRun.objects.filter(claimable, pk=run_id).update(
            status=PlaygroundRun.Status.RUNNING,
            started_at=now,
            stage="Starting",
            error_message="",
        )
        == 1
    )
    if not claimed:
        return None
    run = PlaygroundRun.objects.select_related("job__base_model").get(pk=run_id)

    def stage(text: str) -> None:
        PlaygroundRun.objects.filter(pk=run.pk).update(stage=text[:100])

    adapter = Artifact.objects.filter(job_id=run.job_id, kind=Artifact.Kind.ADAPTER).first()
    try:
        if adapter is None:
            raise FileNotFoundError("The job has no adapter artifact any more.")
        d = run.decoding
        decoding = playground.Decoding(
            **{k: d[k] for k in playground.Decoding.__dataclass_fields__ if k in d}
        )
        result = playground.generate_pair(
            job=run.job,
            prompt=run.prompt,
            system_prompt=run.system_prompt,
            decoding=decoding,
            user=run.created_by,
            subject=run,
            stage=stage,
        )
    except Exception as exc:
        logger.exception("playground run %s failed", run.pk)
        PlaygroundRun.objects.filter(pk=run.pk).update(
            status=PlaygroundRun.Status.FAILED,
            stage="",
            error_message=f"{type(exc).__name__}: {exc}"[:2000],
            completed_at=timezone.now(),
        )
    else:
        PlaygroundRun.objects.filter(pk=run.pk).update(
            status=PlaygroundRun.Status.COMPLETED,
            stage="",
            base_output=result.base_output,
            adapter_output=result.adapter_output,
            timings=result.timings,
            token_counts=result.token_counts,
            device=result.device,
            completed_at=timezone.now(),
        )
    run.refresh_from_db()
    return run
