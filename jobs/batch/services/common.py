"""Constants and helpers every batch workflow shares."""

from __future__ import annotations

import os
from collections.abc import Iterator

from config.errors import InvalidInput

RUNS_MIN, RUNS_MAX = 1, 20
MAX_TASKS = 1_000_000
BULK_BATCH = 2_000
BULK_MEMO = 64
# Dispatch window: at most what a model's rate limit serves in this many seconds sits queued
# or running; a model without a rate limit gets BATCH_MAX_WINDOW.
WINDOW_S = 10.0
MAX_WINDOW = 64
# A dispatch message carries up to this many tasks of one model (one Celery message, one
# window runner), run BATCH_THREADS at a time in the worker process.
MESSAGE_TASKS = 16
BATCH_THREADS = int(os.environ.get("BATCH_THREADS", "8"))
TASK_MAX_ATTEMPTS = 4  # task-level tries after the gateway's own retries are exhausted
DECODING_KEYS = {
    "temperature",
    "top_p",
    "max_tokens",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "stop",
}
DEFAULT_DECODING = {"temperature": 0.7, "max_tokens": 128}
CHARS_PER_TOKEN = 4  # the estimate's prompt tokens: characters / 4 (the gateway counts exactly)


def _invalid(field_name: str, message: str) -> InvalidInput:
    return InvalidInput(message, details={"fields": [{"field": field_name, "message": message}]})


# Ids per IN list: under the bound-parameter limits of SQLite (32,766) and of PostgreSQL's
# server-side binding (65,535), so a selection of a very large corpus stays valid SQL.
ID_SLICE = 10_000


def id_slices(ids: list) -> Iterator[list]:
    for start in range(0, len(ids), ID_SLICE):
        yield ids[start : start + ID_SLICE]
