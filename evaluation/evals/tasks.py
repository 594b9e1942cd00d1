"""Celery tasks of batch evaluations: they take ids and call the services. Items run on the
long queue (model calls); the dispatcher tops the per-model windows up as items finish."""

from __future__ import annotations

from celery import shared_task

from config.longtasks import recoverer
from evaluation.evals import services


@shared_task(
    name="evaluation.evals.tasks.eval_item_run",
    queue="long",
    acks_late=True,
    ignore_result=True,
    soft_time_limit=900,
    time_limit=960,
)
def eval_item_run(item_id: str) -> str | None:
    """Claim and run one batch-evaluation item (a no-op when it is not queued any more)."""
    return services.item_run(item_id=item_id)


@shared_task(name="evaluation.evals.tasks.batch_eval_dispatch", acks_late=True, ignore_result=True)
def batch_eval_dispatch(batch_id: str) -> int:
    return services.batch_eval_dispatch(batch_id=batch_id)


@recoverer("batch_evals")
def _reconcile_batch_evals() -> dict:
    # config.tasks.reconcile_long_tasks (beat, every minute) calls every registered step.
    recovered = services.items_recover()
    from evaluation.models import BatchEval

    for batch_id in BatchEval.objects.filter(status__in=BatchEval.ACTIVE).values_list(
        "pk", flat=True
    ):
        services.batch_eval_dispatch(batch_id=batch_id)
        services.batch_finish_if_done(batch_id=batch_id)
    return {"recovered": recovered}
