"""OpenAI Batch JSONL: a job's requests as a batch input file and its results as the batch output
shape, matched by custom_id."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from jobs.batch.models import BatchJob, BatchTask
from jobs.batch.services.framework_kind import task_request

# --- OpenAI Batch JSONL -------------------------------------------------------------------------


def openai_batch_requests(*, job: BatchJob) -> Iterator[str]:
    """The job's requests as an OpenAI Batch input file: one line per task, ``custom_id`` the
    task id, ``body`` the chat body with the model's remote id."""
    remote = {m["key"]: m["remote_id"] for m in job.frozen["models"]}
    decoding = job.frozen["decoding"]
    qs = job.tasks.select_related("framework_version", "chunk", "chunk__document").order_by("id")
    for task in qs.iterator(chunk_size=500):
        body = {"model": remote[task.model_key], **task_request(task, decoding)}
        yield json.dumps(
            {"custom_id": task.id, "method": "POST", "url": "/v1/chat/completions", "body": body},
            sort_keys=True,
            ensure_ascii=False,
        )


def openai_batch_results(*, job: BatchJob) -> Iterator[str]:
    """Finished tasks in the OpenAI Batch output shape (``id``, ``custom_id``, ``response``
    {status_code, request_id, body}, ``error``), ordered by custom_id."""
    qs = job.tasks.filter(status__in=(BatchTask.Status.SUCCEEDED, BatchTask.Status.FAILED))
    for task in qs.order_by("id").iterator(chunk_size=500):
        ok = task.status == BatchTask.Status.SUCCEEDED or task.raw_output
        body = {
            "id": task.response_id,
            "object": "chat.completion",
            "model": task.model_key,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": task.raw_output},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": task.prompt_tokens,
                "completion_tokens": task.completion_tokens,
                "total_tokens": task.prompt_tokens + task.completion_tokens,
            },
        }
        yield json.dumps(
            {
                "id": f"batch_req_{task.id}",
                "custom_id": task.id,
                "response": {"status_code": 200, "request_id": task.response_id, "body": body}
                if ok
                else None,
                "error": None
                if task.status == BatchTask.Status.SUCCEEDED
                else {"code": task.error_code, "message": task.error_message},
            },
            sort_keys=True,
            ensure_ascii=False,
        )


def openai_batch_match(requests_lines: Iterable[str], results_lines: Iterable[str]) -> list:
    """Pair input and output lines by ``custom_id`` (never by line order)."""
    results = {}
    for line in results_lines:
        row = json.loads(line)
        results[row["custom_id"]] = row
    return [
        (json.loads(line), results.get(json.loads(line)["custom_id"])) for line in requests_lines
    ]
