"""Fixtures for the validation workflow tests (evalcore): a completed job with an adapter in
storage, a fast stand-in for the model scoring (the real one runs in the slow acceptance test),
and a recording stand-in for the PDF renderer where the PDF itself is not under test.

Import the fixtures you need: ``from tests.evaluation.core_fixtures import completed_job, ...``.
"""

from __future__ import annotations

import functools
import io
import json

import pytest
from django.utils import timezone

from config.storage import storage_save
from corpora.services import training_file_create
from evaluation.models import Side, ValidationRun
from training.config import resolve_configuration
from training.models import Artifact, BaseModel, JobStatus, Preset, TrainingJob

SYSTEM = "You are Elena Morales, a warm and emotionally intelligent financial advisor."
# Words a blind page must never contain (they would tell the rater which side is which).
REVEALING = ("baseline", "trained", "adapter")
BASE_REPLY = "Save more money. Budget."
TUNED_REPLY = "I hear how stressful this feels; let's take it one step at a time together."


def training_lines(n: int = 10) -> bytes:
    lines = [
        {
            "id": f"c-{i}",
            "system_prompt": SYSTEM,
            "training_pairs": [
                {
                    "user_input": f"How should I plan for goal number {i}?",
                    "target_response": "Start small, automate it and review it every month.",
                }
            ],
        }
        for i in range(n)
    ]
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def make_completed_job(*, name: str = "Advisor tone v1", user=None) -> TrainingJob:
    training_file = training_file_create(
        name=f"{name} data", upload=io.BytesIO(training_lines()), user=None
    )
    smoke = Preset.objects.get(key="smoke")
    base = BaseModel.objects.get(name="SmolLM2-135M-Instruct")
    job = TrainingJob.objects.create(
        name=name,
        training_file=training_file,
        base_model=base,
        preset=smoke,
        configuration=resolve_configuration(
            preset_hyperparameters=smoke.hyperparameters,
            overrides={},
            context_length=base.context_length,
        ),
        status=JobStatus.COMPLETED,
        progress=100,
        completed_at=timezone.now(),
        created_by=user,
    )
    folder = f"training/jobs/{job.pk}/adapter"
    storage_save(f"{folder}/adapter_config.json", b'{"peft_type": "LORA", "r": 8}')
    storage_save(f"{folder}/adapter_model.safetensors", b"not real weights")
    Artifact.objects.create(job=job, kind=Artifact.Kind.ADAPTER, storage_path=folder)
    return job


@pytest.fixture
def completed_job(db):
    return make_completed_job()


@pytest.fixture
def fast_settings(settings):
    settings.EVALUATION_BOOTSTRAP = 200
    settings.EVALUATION_MAX_NEW_TOKENS = 16
    settings.EVALUATION_BATCH_SIZE = 16
    settings.EVALUATION_JUDGE = "offline"
    settings.EVALUATION_AUTO_START = True
    settings.MODEL_GATEWAY_URL = ""
    settings.HF_TOKEN = ""
    return settings


@functools.cache
def _retention_order() -> dict[str, int]:
    """Question id -> its place in the retention suite (parsed and validated once per process)."""
    from evaluation.suites import load_suite

    return {q["id"]: i for i, q in enumerate(load_suite("knowledge_retention").items)}


class FakeScoring:
    """Stands in for evaluation.scoring: deterministic, instant, with a visible effect of the
    adapter (lower NLL, kinder replies that the judge scores higher)."""

    def __init__(self):
        self.calls: list[tuple[str, bool]] = []
        self.loaded: list[dict] = []

    def load_models(self, *, base_model_dir, adapter_dir=None, device="auto"):
        import os

        self.loaded.append(
            {
                "base_model_dir": base_model_dir,
                "adapter_files": sorted(os.listdir(adapter_dir)) if adapter_dir else [],
            }
        )
        return object()

    def document_nll(self, models, documents, *, use_adapter, max_length):
        from evaluation.scoring import DocNLL

        self.calls.append(("document_nll", use_adapter))
        per_token = 1.6 if use_adapter else 2.6
        # From the document's content, not its position: the service scores one at a time.
        sizes = [sum(len(m["content"]) for m in messages) % 7 for messages in documents]
        return [DocNLL(nll_sum=per_token * (20 + i) + 0.1 * (i % 3), tokens=20 + i) for i in sizes]

    def option_logliks(self, models, questions, *, use_adapter):
        self.calls.append(("option_logliks", use_adapter))
        # The question's place in the suite (the service asks one question at a time).
        order = _retention_order()
        out = []
        for q in questions:
            i = order[q["id"]]
            scores = [-2.0, -2.0, -2.0, -2.0]
            # Base knows 80 of 100, the adapter forgets 2 of those.
            right = i % 5 != 0 and not (use_adapter and i in (1, 2))
            scores[q["answer"] if right else (q["answer"] + 1) % 4] = -0.5
            out.append(scores)
        return out

    @staticmethod
    def mcq_correct(logliks, answers):
        return [
            max(range(len(s)), key=s.__getitem__) == a
            for s, a in zip(logliks, answers, strict=True)
        ]

    def generate(self, models, conversations, *, use_adapter, max_new_tokens, seed, **kw):
        from evaluation.scoring import Generation

        self.calls.append(("generate", use_adapter))
        text = TUNED_REPLY if use_adapter else BASE_REPLY
        return [
            Generation(
                text=f"{text} ({n + 1})",
                stopped=use_adapter or n % 2 == 0,
                new_tokens=12,
                seconds=0.01,
            )
            for n, _ in enumerate(conversations)
        ]

    def judge_offline(self, models, *, rubric, prompt, response):
        dims = rubric if isinstance(rubric, list) else rubric["dimensions"]
        good = response.startswith(TUNED_REPLY)
        return {
            d["key"]: (4 if good else 3) if i % 2 else (5 if good else 3)
            for i, d in enumerate(dims)
        }


@pytest.fixture
def fake_scoring(monkeypatch, fast_settings):
    fake = FakeScoring()
    from evaluation import scoring

    for name in (
        "load_models",
        "document_nll",
        "option_logliks",
        "mcq_correct",
        "generate",
        "judge_offline",
    ):
        monkeypatch.setattr(scoring, name, getattr(fake, name))
    monkeypatch.setattr("evaluation.services._base_model_dir", lambda base: "/models/base")
    return fake


class RecordingRenderer:
    def __init__(self):
        self.contexts: list[dict] = []

    def __call__(self, context: dict) -> bytes:
        self.contexts.append(context)
        return b"%PDF-1.7\n% fake report " + str(len(self.contexts)).encode() + b"\n%%EOF\n"


@pytest.fixture
def fake_pdf(monkeypatch):
    renderer = RecordingRenderer()
    import evaluation.report as report_module

    monkeypatch.setattr(report_module, "render_report_pdf", renderer)
    return renderer


@pytest.fixture
def on_commit_now(monkeypatch):
    """on_commit callbacks run at once; Celery tasks run inline."""
    from evaluation import services, tasks

    monkeypatch.setattr(
        tasks.execute_validation_run,
        "delay",
        lambda run_id: services.validation_run_execute(run_id=run_id),
    )
    monkeypatch.setattr(
        tasks.recompute_validation_metrics,
        "delay",
        lambda run_id: tasks.recompute_validation_metrics(run_id),
    )
    monkeypatch.setattr("django.db.transaction.on_commit", lambda fn, *a, **k: fn())


@pytest.fixture
def completed_run(completed_job, fake_scoring, fake_pdf):
    from evaluation import services

    run = services.validation_run_create(job=completed_job, user=None, enqueue=False)
    services.validation_run_execute(run_id=str(run.pk))
    run.refresh_from_db()
    assert run.status == "completed", (run.error_type, run.error_message)
    return run


def rate_all(run: ValidationRun, rater, *, suite: str, base: int, tuned: int, limit: int = 999):
    """Rate up to ``limit`` items of ``suite`` through the service, as a rater would: the score
    for each blind side is chosen by looking the side up server-side (the test knows)."""
    from evaluation import services
    from evaluation.suites import load_suite

    keys = [d["key"] for d in load_suite(suite).rubric["dimensions"]]
    done = 0
    while done < limit:
        pair = services.rating_pair_next(run=run, rater=rater, suite=suite)
        if pair is None:
            break
        left = base if pair.left_side == Side.BASELINE else tuned
        right = tuned if pair.left_side == Side.BASELINE else base
        services.rating_submit(
            pair=pair,
            rater=rater,
            left_scores=dict.fromkeys(keys, left),
            right_scores=dict.fromkeys(keys, right),
        )
        done += 1
    return done


def require_poppler() -> None:
    """PDF-page tests need poppler-utils (pdftoppm, pdftotext): skipped without them, but a
    failure where CRUCIBLE_REQUIRE_BROWSER=1 says the page checks must run (as in CI)."""
    import os
    import shutil

    missing = [tool for tool in ("pdftoppm", "pdftotext") if not shutil.which(tool)]
    if not missing:
        return
    reason = f"needs poppler-utils ({', '.join(missing)} not found)"
    if os.environ.get("CRUCIBLE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"CRUCIBLE_REQUIRE_BROWSER=1 but the PDF-page tests cannot run: {reason}")
    pytest.skip(reason)
