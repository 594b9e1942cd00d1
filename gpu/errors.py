"""The worker's error types (PROTOCOL.md §4 ``error`` event) and their exit codes (§1)."""

from __future__ import annotations

import socket
import traceback
from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_DATASET = 2
EXIT_OOM = 3
EXIT_MODEL_ACCESS = 4
EXIT_NAN = 5
EXIT_STOPPED = 143


class WorkerError(Exception):
    """Base class: anything that stops the job. ``details`` travel in the error event."""

    error_type = "WorkerError"
    exit_code = EXIT_ERROR

    def __init__(self, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}


class SpecError(WorkerError):
    """The job spec is missing, unreadable or invalid."""


class DatasetFormatError(WorkerError):
    """The training file is unusable; row-level when ``row`` is known."""

    error_type = "DatasetFormatError"
    exit_code = EXIT_DATASET

    def __init__(
        self,
        message: str,
        row: int | None = None,
        conversation_id: str | None = None,
        field: str | None = None,
        details: dict[str, Any] | None = None,
    ):
        super().__init__(
            message,
            {"row": row, "conversation_id": conversation_id, "field": field, **(details or {})},
        )
        self.row = row
        self.conversation_id = conversation_id
        self.field = field


class OutOfMemoryError(WorkerError):
    error_type = "OutOfMemoryError"
    exit_code = EXIT_OOM


class ModelAccessError(WorkerError):
    error_type = "ModelAccessError"
    exit_code = EXIT_MODEL_ACCESS


class NaNLossError(WorkerError):
    error_type = "NaNLossError"
    exit_code = EXIT_NAN


class NetworkError(WorkerError):
    error_type = "NetworkError"


class WorkerTimeoutError(WorkerError):
    error_type = "TimeoutError"


class StopRequested(Exception):
    """SIGTERM arrived; unwinds to the entry point, which reports ``stopped`` and exits 143."""

    def __init__(self, reason: str = "SIGTERM"):
        super().__init__(reason)
        self.reason = reason


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is always there in the worker
        pass
    text = str(exc).lower()
    return isinstance(exc, RuntimeError | MemoryError) and (
        "out of memory" in text or isinstance(exc, MemoryError)
    )


def _is_model_access(exc: BaseException) -> bool:
    name = type(exc).__name__
    if name in {"GatedRepoError", "RepositoryNotFoundError", "RevisionNotFoundError"}:
        return True
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if name == "HfHubHTTPError" and status in (401, 403):
        return True
    text = str(exc).lower()
    return isinstance(exc, OSError) and (
        "gated repo" in text
        or "401 client error" in text
        or "403 client error" in text
        or "is not a valid model identifier" in text
        or ("restricted" in text and "access" in text)
    )


def _is_timeout(exc: BaseException) -> bool:
    name = type(exc).__name__
    return isinstance(exc, TimeoutError | socket.timeout) or name in {
        "ReadTimeout",
        "ConnectTimeout",
        "Timeout",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "TimeoutException",
    }


def _is_network(exc: BaseException) -> bool:
    name = type(exc).__name__
    if name in {
        "URLError",
        "ConnectionError",
        "EndpointConnectionError",
        "ConnectError",
        "NewConnectionError",
        "MaxRetryError",
    }:
        return True
    return isinstance(exc, ConnectionError)


def classify(exc: BaseException, oom_details: dict[str, Any] | None = None) -> WorkerError:
    """Map any exception to one of the PROTOCOL's error types (keeps WorkerErrors as they are)."""
    if isinstance(exc, WorkerError):
        if isinstance(exc, OutOfMemoryError) and oom_details:
            exc.details = {**oom_details, **exc.details}
        return exc
    chain = list(_chain(exc))
    message = f"{type(exc).__name__}: {exc}"
    if any(_is_oom(e) for e in chain):
        return OutOfMemoryError(
            "Out of memory during training; lower micro_batch_size or max_seq_length "
            f"(raise gradient_accumulation_steps to keep the batch). {message}",
            dict(oom_details or {}),
        )
    if any(_is_model_access(e) for e in chain):
        return ModelAccessError(f"Access to the base model was denied: {message}")
    if any(_is_timeout(e) for e in chain):
        return WorkerTimeoutError(message)
    if any(_is_network(e) for e in chain):
        return NetworkError(message)
    return WorkerError(message)


def format_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
