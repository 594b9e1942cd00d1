"""Batch LLM job workflows, one module per workflow (re-exported here, the one import
callers use):

- ``planning``: framework sync and resolution; validation, task count, token and cost
  estimate and the budget check of a job before it exists;
- ``creation``: the frozen audit record, deterministic task ids, bulk task creation (framework
  jobs, and item jobs of other kinds such as batch evaluations);
- ``framework_kind``: the engine's own task kind (a framework's prompt over a chunk, the answer
  validated against its schema and repaired once);
- ``engine``: bounded dispatch per model, the claimed run of one task of any kind, windows,
  pause/resume/cancel, crash recovery and inline runs;
- ``openai_batch``: OpenAI Batch JSONL in and out, matched by ``custom_id``;
- ``common``: the constants they share.
"""

from jobs.batch.services.common import (
    BATCH_THREADS,
    BULK_BATCH,
    BULK_MEMO,
    CHARS_PER_TOKEN,
    DECODING_KEYS,
    DEFAULT_DECODING,
    MAX_TASKS,
    MAX_WINDOW,
    MESSAGE_TASKS,
    RUNS_MAX,
    RUNS_MIN,
    TASK_MAX_ATTEMPTS,
    WINDOW_S,
)
from jobs.batch.services.creation import (
    TaskSpec,
    code_version,
    job_create,
    job_create_items,
    task_id,
    tasks_bulk_create,
    tasks_bulk_insert,
)
from jobs.batch.services.engine import (
    after_task,
    batch_reconcile,
    enqueue_dispatch,
    job_cancel,
    job_context,
    job_dispatch,
    job_finish_if_done,
    job_get,
    job_kind,
    job_pause,
    job_resume,
    job_run_inline,
    task_run,
    tasks_recover,
    tasks_run_window,
)
from jobs.batch.services.framework_kind import (
    FRAMEWORK_KIND,
    FrameworkKind,
    JobContext,
    framework_response_format,
    task_messages,
    task_request,
)
from jobs.batch.services.openai_batch import (
    openai_batch_match,
    openai_batch_requests,
    openai_batch_results,
)
from jobs.batch.services.planning import (
    Plan,
    budget_remaining,
    framework_resolve,
    framework_sync,
    job_plan,
    window_size,
)

__all__ = [
    "BATCH_THREADS",
    "BULK_BATCH",
    "BULK_MEMO",
    "CHARS_PER_TOKEN",
    "DECODING_KEYS",
    "DEFAULT_DECODING",
    "FRAMEWORK_KIND",
    "MAX_TASKS",
    "MAX_WINDOW",
    "MESSAGE_TASKS",
    "RUNS_MAX",
    "RUNS_MIN",
    "TASK_MAX_ATTEMPTS",
    "WINDOW_S",
    "FrameworkKind",
    "JobContext",
    "Plan",
    "TaskSpec",
    "after_task",
    "batch_reconcile",
    "budget_remaining",
    "code_version",
    "enqueue_dispatch",
    "framework_resolve",
    "framework_response_format",
    "framework_sync",
    "job_cancel",
    "job_context",
    "job_create",
    "job_create_items",
    "job_dispatch",
    "job_finish_if_done",
    "job_get",
    "job_kind",
    "job_pause",
    "job_plan",
    "job_resume",
    "job_run_inline",
    "openai_batch_match",
    "openai_batch_requests",
    "openai_batch_results",
    "task_id",
    "task_messages",
    "task_request",
    "task_run",
    "tasks_bulk_create",
    "tasks_bulk_insert",
    "tasks_recover",
    "tasks_run_window",
    "window_size",
]
