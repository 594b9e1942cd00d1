"""GPU providers behind one interface: launch, status, cancel, logs."""

from training.executors.base import Executor, ExecutorState, ExecutorStatus


def get_executor(name: str) -> Executor:
    if name == "local":
        from training.executors.local import LocalExecutor

        return LocalExecutor()
    if name == "runpod":
        from training.executors.runpod import RunPodExecutor

        return RunPodExecutor()
    raise ValueError(f"Unknown executor '{name}'")


__all__ = ["Executor", "ExecutorState", "ExecutorStatus", "get_executor"]
