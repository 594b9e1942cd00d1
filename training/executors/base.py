from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class ExecutorState(StrEnum):
    STARTING = "starting"  # provisioning, not yet running the worker
    RUNNING = "running"
    EXITED = "exited"  # the worker process ended (by itself or killed)
    GONE = "gone"  # the instance no longer exists (e.g. a preempted pod)
    UNKNOWN = "unknown"  # the provider could not be asked (its own fault, not the job's)


@dataclass(frozen=True)
class ExecutorStatus:
    state: ExecutorState
    exit_code: int | None = None
    detail: str = ""

    @property
    def alive(self) -> bool:
        return self.state in (ExecutorState.STARTING, ExecutorState.RUNNING)


class Executor(Protocol):
    """What every GPU provider implements. ``ref`` is the provider's handle (pid, pod id)."""

    name: str

    def launch(self, *, job_id: str, attempt: int, spec: dict, env: dict) -> str:
        """Start the worker with ``spec``; return the handle stored on the job."""

    def status(self, *, ref: str) -> ExecutorStatus: ...

    def cancel(self, *, ref: str, force: bool = False) -> None:
        """Ask the worker to stop (SIGTERM: it checkpoints first); ``force`` kills it."""

    def logs(self, *, job_id: str, tail: int = 200) -> str: ...
