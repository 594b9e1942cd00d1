"""A real Celery worker process for the long-task tests, with model scoring stood in.

Started as ``celery -A tests.evaluation.long_worker worker -Q long ...`` by
tests/evaluation/test_long_runs.py: the app, the settings, the routes, the broker, the database,
the tasks, the services and the claims are the real ones; only what would need a model (scoring,
the PDF renderer) and a GPU (the training executor) is replaced, in this process and the pool
processes it forks. The stand-ins are slow on purpose (a test kills or outlives them) and log
each call to ``$LONG_WORKER_CALLS`` (one JSON line per call) so a test can see what was redone.

``$LONG_WORKER_HOLD``: while that file exists, each generation batch waits (up to 120 s), so a
run stays in its "generating" stage as long as a test needs it to.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import django

from config.celery import app  # noqa: F401  (celery -A finds it here)

django.setup()

from tests.evaluation.core_fixtures import FakeScoring, RecordingRenderer  # noqa: E402

CALLS = os.environ.get("LONG_WORKER_CALLS", "")
HOLD = os.environ.get("LONG_WORKER_HOLD", "")
BATCH_SECONDS = float(os.environ.get("LONG_WORKER_BATCH_SECONDS", "0.5"))


def _log(kind: str, **data) -> None:
    if CALLS:
        with open(CALLS, "a") as handle:
            handle.write(json.dumps({"call": kind, "pid": os.getpid(), **data}) + "\n")


class SlowScoring(FakeScoring):
    def document_nll(self, models, documents, *, use_adapter, max_length):
        _log("document_nll", n=len(documents), adapter=use_adapter)
        return super().document_nll(models, documents, use_adapter=use_adapter, max_length=0)

    def option_logliks(self, models, questions, *, use_adapter):
        time.sleep(0.01)
        _log("option_logliks", n=len(questions), adapter=use_adapter)
        return super().option_logliks(models, questions, use_adapter=use_adapter)

    def generate(self, models, conversations, *, use_adapter, max_new_tokens, seed, **kw):
        deadline = time.monotonic() + 120
        while HOLD and Path(HOLD).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(BATCH_SECONDS)
        _log("generate", n=len(conversations), adapter=use_adapter)
        return super().generate(
            models, conversations, use_adapter=use_adapter, max_new_tokens=max_new_tokens, seed=seed
        )


class RecordingExecutor:
    """Stands in for the local executor: a launch is recorded, the worker 'runs'."""

    name = "local"

    def launch(self, *, job_id, attempt, spec, env):
        _log("launch", job_id=job_id, attempt=attempt)
        return f"fake-{job_id}-{attempt}"

    def status(self, *, ref):
        from training.executors import ExecutorState, ExecutorStatus

        return ExecutorStatus(ExecutorState.RUNNING)

    def cancel(self, *, ref, force=False):
        _log("executor_cancel", ref=ref)

    def logs(self, *, job_id, tail=200):
        return ""


def _install() -> None:
    from evaluation import report, scoring, services
    from training import services as training_services

    fake = SlowScoring()
    for name in ("load_models", "document_nll", "option_logliks", "generate", "judge_offline"):
        setattr(scoring, name, getattr(fake, name))
    scoring.mcq_correct = FakeScoring.mcq_correct
    services._base_model_dir = lambda base: "/models/base"
    report.render_report_pdf = RecordingRenderer()
    training_services.get_executor = lambda name: RecordingExecutor()


_install()
