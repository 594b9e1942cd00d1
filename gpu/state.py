"""Small shared state objects (no heavy imports: train.py loads them before torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunState:
    """Shared between the main thread, the tickers and the signal handler."""

    stage: str = "starting"
    step: int = 0
    total_steps: int = 0
    stop_requested: str | None = None
    last_checkpoint_uri: str | None = None


@dataclass
class ResumeInfo:
    """What the resumed checkpoint promises, for the resume_check event."""

    step: int
    expected_step: int
    expected_learning_rate: float | None
    last_logged_loss: float | None
    prior: dict[str, Any] = field(default_factory=dict)  # crucible_state.json of the checkpoint
