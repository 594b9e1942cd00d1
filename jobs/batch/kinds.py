"""What a batch job's tasks do, by the job's ``kind``.

The engine (jobs/batch/services/engine.py) owns a task's life whatever it does: bulk creation with
deterministic ids, bounded dispatch per model, the atomic claim, heartbeats, retries of
transient gateway errors with backoff and Retry-After, pause/resume/cancel, crash recovery and
the job's end. A kind owns the rest: what one claimed task does (its gateway calls and what it
keeps), what a task that fails outside its code leaves behind, and what follows progress.

The engine's own kind, 'framework', is a framework over corpus chunks (registered by
services/framework_kind.py). An app above jobs registers its kinds in its
``AppConfig.ready()`` (evaluation: 'eval', a rubric over dataset samples), so jobs never
imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from jobs.batch.models import BatchJob, BatchTask


@dataclass
class Outcome:
    """A task's result: its final (or, for a retry, pending) status and the task row's fields
    to write with it (``calls`` is added to the row's count)."""

    status: str
    fields: dict


class TaskContext(Protocol):
    job_id: Any


class TaskKind(Protocol):
    name: str

    def context(self, job: BatchJob) -> TaskContext:
        """What every task of ``job`` shares, read once per window of tasks."""
        ...

    def run(self, task: BatchTask, ctx: TaskContext) -> Outcome:
        """Run one claimed task. A ``gateway.GatewayError`` raised here is the engine's to
        handle (transient: pending again after a backoff; else failed with its code)."""
        ...

    def failed(self, *, job_id, task_ids: list[str], code: str, message: str) -> None:
        """Tasks the engine failed without ``run`` returning (a permanent gateway error, a
        crash, a worker lost on every try)."""
        ...

    def progress(self, *, job_id, final: bool) -> None:
        """Tasks finished (``final``: the job ended): refresh what depends on them."""
        ...


_KINDS: dict[str, TaskKind] = {}


def kind_register(kind: TaskKind) -> None:
    _KINDS[kind.name] = kind


def kind_get(name: str) -> TaskKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise LookupError(
            f"No batch task kind {name!r} is registered (known: {', '.join(sorted(_KINDS))})."
        ) from None
