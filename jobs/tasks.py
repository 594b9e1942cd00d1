"""Background work of the model gateway's registry."""

from __future__ import annotations

from celery import shared_task

from jobs import services


@shared_task(name="jobs.tasks.refresh_gateway_models", acks_late=True, ignore_result=True)
def refresh_gateway_models(provider_id: int | None = None) -> list[dict]:
    """Beat (hourly) and the settings page's "Refresh models": one provider or all enabled."""
    from jobs.models import Provider

    provider = None
    if provider_id is not None:
        provider = Provider.objects.filter(pk=provider_id).first()
        if provider is None:
            return []
    return [r.as_dict() for r in services.registry_refresh(provider=provider)]


# Batch LLM jobs (issue 14): their tasks live in jobs/batch/tasks.py.
from jobs.batch import tasks as batch_tasks  # noqa: E402,F401
