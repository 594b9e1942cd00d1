"""The TrainerCallback that turns the training loop into PROTOCOL.md events.

metrics at every logging step (and from a ticker when the last one is over 60 s old),
checkpoint publication on every save, the resume check after a resume, and a clean stop at
the next step boundary when SIGTERM arrived.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from gpu.checkpoints import CRUCIBLE_STATE, publish_checkpoint_retrying
from gpu.state import ResumeInfo, RunState

log = logging.getLogger("crucible.worker.train")

METRIC_FIELDS = (
    "step",
    "total_steps",
    "epoch",
    "train_loss",
    "val_loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_second",
    "gpu_memory_mb",
    "elapsed_seconds",
    "eta_seconds",
)
STALE_METRICS_SECONDS = 60.0
# The first loss after a resume must lie within this relative distance of the last loss logged
# before the checkpoint (plus a small absolute slack for near-zero losses). A resume that lost
# the adapter or optimizer state jumps back towards the untrained loss and fails it.
RESUME_LOSS_RTOL = 0.5
RESUME_LOSS_ATOL = 0.1
RESUME_LR_RTOL = 1e-5


def _gpu_memory_mb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


class CrucibleCallback(TrainerCallback):
    def __init__(self, emitter, run_state: RunState, storage, resume: ResumeInfo | None = None):
        self.emitter = emitter
        self.run = run_state
        self.storage = storage
        self.resume = resume
        self.trainer = None  # set by the worker once the trainer exists
        self.last_saved_step: int | None = None
        self._lock = threading.RLock()
        prior = resume.prior if resume else {}
        self.history: list[dict] = list(prior.get("history", []))
        self.prior_tokens = int(prior.get("train_tokens", 0))
        self.prior_elapsed = float(prior.get("elapsed_seconds", 0.0))
        self.last_train_loss: float | None = prior.get("last_train_loss")
        self.last_val_loss: float | None = prior.get("last_val_loss")
        self.last_val_step: int | None = prior.get("last_val_step")  # the step it was measured
        self.last_lr: float | None = None
        self.last_grad_norm: float | None = None
        self.epoch: float = 0.0
        self._t0: float | None = None
        self._start_step = 0
        self._last_metrics_time = time.monotonic()
        self._rate_mark: tuple[float, int] | None = None
        self._last_rate: float | None = None
        self._resume_pending = resume is not None
        self._resume_actual_step: int | None = None
        self._resume_actual_lr: float | None = None

    # ------------------------------------------------------------ accounting
    def _tokens_this_run(self) -> int:
        return int(getattr(self.trainer, "real_tokens_seen", 0)) if self.trainer else 0

    def train_tokens(self) -> int:
        return self.prior_tokens + self._tokens_this_run()

    def elapsed(self) -> float:
        return self.prior_elapsed + (time.monotonic() - self._t0 if self._t0 else 0.0)

    def _record(self, step: int, new_window: bool = True) -> dict:
        """A metrics record; tokens/s over the window since the previous training log."""
        now = time.monotonic()
        tokens = self._tokens_this_run()
        mark_time, mark_tokens = self._rate_mark or (self._t0 or now, 0)
        if tokens > mark_tokens and now > mark_time:
            rate = (tokens - mark_tokens) / (now - mark_time)
            self._last_rate = rate
        else:
            rate = self._last_rate
        if new_window:
            self._rate_mark = (now, tokens)
        done = step - self._start_step
        eta = None
        if self._t0 and done > 0:
            eta = round((now - self._t0) / done * max(self.run.total_steps - step, 0), 1)
        return {
            "step": step,
            "total_steps": self.run.total_steps,
            "epoch": round(self.epoch, 4) if self.epoch is not None else None,
            "train_loss": self.last_train_loss,
            "val_loss": None,
            "learning_rate": self.last_lr,
            "grad_norm": self.last_grad_norm,
            "tokens_per_second": round(rate, 2) if rate is not None else None,
            "gpu_memory_mb": _gpu_memory_mb(),
            "elapsed_seconds": round(self.elapsed(), 2),
            "eta_seconds": eta,
        }

    def _emit_metrics(self, step: int, val_loss: float | None = None, new_window=True) -> None:
        with self._lock:
            record = self._record(step, new_window)
            record["val_loss"] = val_loss
            self.history.append(record)
            self._last_metrics_time = time.monotonic()
        self.emitter.emit("metrics", record)

    def maybe_emit_stale_metrics(self) -> None:
        """Called by a ticker: metrics go out at least every 60 s while training."""
        if self.run.stage != "training" or self._t0 is None:
            return
        if time.monotonic() - self._last_metrics_time >= STALE_METRICS_SECONDS:
            self._emit_metrics(self.run.step, new_window=False)

    # ------------------------------------------------------------ trainer events
    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.monotonic()
        self._start_step = state.global_step
        self.run.step = state.global_step
        self.epoch = state.epoch or 0.0
        self._last_metrics_time = time.monotonic()
        if self.resume:
            self._resume_actual_step = state.global_step

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # The LR the optimizer just used for this step (the scheduler steps after this).
        if self._resume_pending and self._resume_actual_lr is None and optimizer is not None:
            self._resume_actual_lr = float(optimizer.param_groups[0]["lr"])

    def on_step_end(self, args, state, control, **kwargs):
        self.run.step = state.global_step
        self.epoch = state.epoch or self.epoch
        if self.run.stop_requested:
            control.should_save = True
            control.should_training_stop = True
            log.warning(
                "stop requested (%s): saving a checkpoint at step %d",
                self.run.stop_requested,
                state.global_step,
            )
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        self.epoch = state.epoch or self.epoch
        if "loss" in logs:
            self.last_train_loss = float(logs["loss"])
            if "learning_rate" in logs:
                self.last_lr = float(logs["learning_rate"])
            if logs.get("grad_norm") is not None:
                self.last_grad_norm = float(logs["grad_norm"])
            self._emit_metrics(state.global_step)
            if self._resume_pending:
                self._emit_resume_check(self.last_train_loss)
        if "eval_loss" in logs:
            self.last_val_loss = float(logs["eval_loss"])
            self.last_val_step = state.global_step
            self._emit_metrics(state.global_step, val_loss=self.last_val_loss, new_window=False)

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        local = Path(args.output_dir) / f"checkpoint-{step}"
        if not local.is_dir():
            log.error("checkpoint folder %s is missing; nothing published", local)
            return
        (local / CRUCIBLE_STATE).write_text(json.dumps(self.state_snapshot(), indent=1))
        published, problem = publish_checkpoint_retrying(self.storage, local, step)
        if published is None:
            # The storage stayed unreachable: training goes on and the next save tries again;
            # without its manifest, this step's partial upload is never resumed from.
            self.emitter.emit(
                "warning",
                {
                    "code": "checkpoint_skipped",
                    "message": f"Checkpoint at step {step} skipped: the storage failed "
                    f"({problem}).",
                    "details": {"step": step},
                },
            )
            return
        self.run.last_checkpoint_uri = published["uri"]
        self.last_saved_step = step
        self.emitter.emit("checkpoint", published)

    def on_train_end(self, args, state, control, **kwargs):
        if self._resume_pending:  # resumed at the very end: no step ran after the checkpoint
            self._emit_resume_check(None)

    # ------------------------------------------------------------ resume
    def state_snapshot(self) -> dict:
        with self._lock:
            history = list(self.history)
        return {
            "history": history,
            "train_tokens": self.train_tokens(),
            "elapsed_seconds": self.elapsed(),
            "last_train_loss": self.last_train_loss,
            "last_val_loss": self.last_val_loss,
            "last_val_step": self.last_val_step,
        }

    def _emit_resume_check(self, first_loss: float | None) -> None:
        self._resume_pending = False
        info = self.resume
        problems = []
        if self._resume_actual_step != info.expected_step:
            problems.append(
                f"resumed at step {self._resume_actual_step}, "
                f"the checkpoint is at {info.expected_step}"
            )
        exp_lr, act_lr = info.expected_learning_rate, self._resume_actual_lr
        if first_loss is not None:
            if exp_lr is None or act_lr is None:
                problems.append("learning rate unknown")
            elif not math.isclose(act_lr, exp_lr, rel_tol=RESUME_LR_RTOL, abs_tol=1e-12):
                problems.append(
                    f"learning rate {act_lr:.6g} differs from the schedule's {exp_lr:.6g}"
                )
        last = info.last_logged_loss
        tolerance = RESUME_LOSS_RTOL * abs(last or 0) + RESUME_LOSS_ATOL
        if (
            first_loss is not None
            and last is not None
            and (not math.isfinite(first_loss) or abs(first_loss - last) > tolerance)
        ):
            problems.append(
                f"first loss after resume {first_loss:.4f} is not within {RESUME_LOSS_RTOL:.0%} "
                f"(+{RESUME_LOSS_ATOL}) of the last logged loss {last:.4f}"
            )
        passed = not problems
        first_text = None if first_loss is None else round(first_loss, 4)
        last_text = None if last is None else round(last, 4)
        message = (
            f"resumed at step {self._resume_actual_step} with the expected learning rate; "
            f"first loss {first_text} vs last logged {last_text} (tolerance "
            f"{RESUME_LOSS_RTOL:.0%} relative + {RESUME_LOSS_ATOL} absolute)"
            if passed
            else "; ".join(problems)
        )
        self.emitter.emit(
            "resume_check",
            {
                "resumed_from_step": info.step,
                "expected_step": info.expected_step,
                "actual_step": self._resume_actual_step,
                "expected_learning_rate": exp_lr,
                "actual_learning_rate": act_lr,
                "last_logged_loss": last,
                "first_loss_after_resume": first_loss,
                "passed": passed,
                "message": message,
            },
        )
        if not passed:
            log.error("resume check failed: %s", message)
