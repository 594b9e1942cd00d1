"""The Celery application. Settings come from Django's settings under the CELERY_ prefix."""

import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("crucible")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.before_task_publish.connect
def _propagate_request_id(headers=None, **_kwargs):
    """Carry the current request ID into the task so its log lines share it."""
    from config.logging import current_request_id

    if headers is not None and current_request_id():
        headers.setdefault("request_id", current_request_id())


@signals.task_prerun.connect
def _bind_request_id(task=None, **_kwargs):
    from config.logging import bind_context

    if task is None:
        return
    request_id = getattr(task.request, "request_id", None) or f"task-{task.request.id}"
    bind_context(request_id=request_id, user="-")


@signals.task_postrun.connect
def _unbind_request_id(**_kwargs):
    from config.logging import clear_context

    clear_context()


@signals.worker_ready.connect
def _announce_worker(**_kwargs):
    """A worker that just started is alive: show it at once instead of after a beat period."""
    from config.tasks import worker_heartbeat

    worker_heartbeat()
