"""The 'eval' kind of batch job: a rubric over dataset samples.

The batch engine (jobs/batch/services/engine.py) creates, dispatches, claims, retries, recovers and
ends the tasks; this kind scores one claimed task's sample into its item (the EvalRun tied to
the task, one per task) and tells the engine how it ended:

- scored (passed or below threshold): the task succeeded;
- an invalid answer, a judge refusal, a permanent provider error, or a transient one on the
  last try: the task failed, with the failure class as its error code;
- a transient gateway error with tries left: raised, so the engine puts the task back to
  pending after its backoff (honouring Retry-After), and the item waits as pending.
"""

from __future__ import annotations

from decimal import Decimal

from django.utils import timezone

from evaluation.evals import rubrics as rubric_registry
from evaluation.evals import scorers, services
from evaluation.models import BatchEval, EvalRun
from jobs import gateway
from jobs.batch.kinds import Outcome, kind_register
from jobs.batch.models import BatchJob, BatchTask
from jobs.batch.services import TASK_MAX_ATTEMPTS

# What a failure outside the kind's own code (the engine's) is classed as: the task's error
# code names the cause (worker_lost, internal_error, or the gateway's code).
ENGINE_FAILURE = EvalRun.Failure.PLATFORM_ERROR


class EvalContext:
    """What a batch evaluation's tasks share, read once per window of tasks."""

    def __init__(self, job: BatchJob):
        self.job_id = job.pk
        self.batch = BatchEval.objects.only("pk", "status", "rubric").get(job=job)
        self.rubric = rubric_registry.rubric_get(self.batch.rubric)
        self.started = self.batch.status != BatchEval.Status.QUEUED

    @property
    def kind(self) -> EvalKind:
        return EVAL


class EvalKind:
    name = services.EVAL_KIND

    def context(self, job: BatchJob) -> EvalContext:
        return EvalContext(job)

    def run(self, task: BatchTask, ctx: EvalContext) -> Outcome:
        now = timezone.now()
        if not ctx.started:
            BatchEval.objects.filter(pk=ctx.batch.pk, status=BatchEval.Status.QUEUED).update(
                status=BatchEval.Status.RUNNING, started_at=now
            )
            ctx.started = True
        item = EvalRun.objects.select_related("created_by").get(task_id=task.pk)
        item.status = EvalRun.Status.RUNNING
        item.attempts = task.attempts
        item.started_at = item.started_at or now
        # A retried item starts its scores afresh (its tokens and cost add up: they were spent).
        item.scores, item.passed, item.failure, item.judge = {}, None, "", {}
        calls = 0
        try:
            calls = services.produce_and_score(item, ctx.rubric, interactive=False, subject=task)
        except gateway.GatewayError as exc:
            if exc.transient and task.attempts < TASK_MAX_ATTEMPTS:
                item.status = EvalRun.Status.PENDING
                item.error_message = services.classify(exc)[1][:2000]
                item.save()
                raise  # the engine retries it after its backoff
            services.record_failure(item, ctx.rubric, exc)
            calls = max(calls, 1)
        except (scorers.JudgeRefused, scorers.JudgeInvalid) as exc:
            services.record_failure(item, ctx.rubric, exc)
            calls = max(calls, 2 if item.model_key else 1)
        item.finished_at = timezone.now()
        item.save()
        failed = item.status == EvalRun.Status.FAILED
        return Outcome(
            BatchTask.Status.FAILED if failed else BatchTask.Status.SUCCEEDED,
            {
                "calls": calls,
                "raw_output": item.output,
                "parsed_output": {"passed": item.passed, "scores": item.scores},
                "error_code": item.failure if failed else "",
                "error_message": item.error_message if failed else "",
                "latency_ms": item.latency_ms,
                "prompt_tokens": item.prompt_tokens,
                "completion_tokens": item.completion_tokens,
                "cost": Decimal(item.cost),
                "model_revision": task.model_revision,
            },
        )

    def failed(self, *, job_id, task_ids: list[str], code: str, message: str) -> None:
        EvalRun.objects.filter(task_id__in=task_ids).update(
            status=EvalRun.Status.FAILED,
            failure=ENGINE_FAILURE,
            passed=False,
            error_message=f"{code}: {message}"[:2000],
            finished_at=timezone.now(),
        )

    def progress(self, *, job_id, final: bool) -> None:
        # Live aggregates are computed on read while the batch runs; the final ones are kept.
        if final:
            services.batch_finish(job_id=job_id)


EVAL = EvalKind()


def register() -> None:
    kind_register(EVAL)
