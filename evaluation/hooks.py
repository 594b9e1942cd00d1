"""Evaluation's subscriptions to what training announces (training/hooks.py)."""

from __future__ import annotations


def _on_job_completed(sender, job, **kwargs) -> None:
    from evaluation.services import validation_on_job_completed

    validation_on_job_completed(job=job)  # enqueued on commit; never raises


def connect() -> None:
    from training import hooks as training

    training.job_completed.connect(_on_job_completed, dispatch_uid="evaluation-auto-validation")
