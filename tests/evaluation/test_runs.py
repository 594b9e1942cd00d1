"""Validation runs: start (by hand and on job completion), atomic claim, the stored parts."""
# ruff: noqa: F811  (fixtures imported from core_fixtures are redefined as arguments)

import pytest

from evaluation import services
from evaluation.models import GeneratedResponse, JudgeScore, Report, RunStatus, ValidationRun
from evaluation.suites import all_suites
from tests.evaluation.core_fixtures import (  # noqa: F401
    completed_job,
    completed_run,
    fake_pdf,
    fake_scoring,
    fast_settings,
    make_completed_job,
    on_commit_now,
)
from training.models import Artifact, JobStatus

pytestmark = pytest.mark.django_db


def test_a_run_records_every_part_and_what_it_was_measured_with(completed_run, fake_scoring):
    run = completed_run
    suites = all_suites()
    assert run.progress == 100 and run.stage == "completed"
    assert run.started_at <= run.completed_at
    assert run.evaluator_version == services.EVALUATOR_VERSION
    assert run.suites == {n: {"version": s.version, "sha256": s.sha256} for n, s in suites.items()}
    assert run.base_model and run.adapter_uri.endswith("/adapter")
    assert run.decoding["max_new_tokens"] == 16 and run.decoding["batch_size"] == 16
    assert run.seeds["split"] == run.job.configuration["hyperparameters"]["seed"]
    # The adapter files were copied out of storage for the model loader.
    assert fake_scoring.loaded[0]["adapter_files"] == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    ppl = run.metrics["perplexity"]
    assert ppl["baseline"] > ppl["trained"]
    assert ppl["ci_low"] <= ppl["improvement_pct"] <= ppl["ci_high"]
    assert ppl["passed"] is True and "improvement" in ppl["display"]
    # 20% of the 10 conversations, split as the worker splits them.
    assert ppl["n_documents"] == len(ppl["documents"]) == 2

    ret = run.metrics["retention"]
    assert ret["n_questions"] == 100
    assert ret["baseline_accuracy"] == 0.8 and ret["trained_accuracy"] == 0.78
    assert ret["retention_pct"] == pytest.approx(97.5)
    assert ret["ci_low"] is not None and ret["alert"] is False

    n_ei = len(suites["emotional_intelligence"].items)
    n_bv = len(suites["brand_voice"].items)
    assert (n_ei, n_bv) == (50, 30)
    assert GeneratedResponse.objects.filter(run=run).count() == 2 * (n_ei + n_bv)
    assert JudgeScore.objects.filter(response__run=run).count() == 2 * (n_ei + n_bv)

    ei = run.metrics["emotional_intelligence"]
    assert ei["source"] == "judge" and ei["n"] == 50
    assert ei["trained_mean"] > ei["baseline_mean"]
    assert set(ei["per_dimension"]) == {"empathy", "clarity", "appropriateness"}
    assert ei["agreement"] is None  # no human ratings yet

    bv = run.metrics["brand_voice"]
    assert bv["source"] == "judge" and bv["n_responses"] == 30
    assert len(bv["per_characteristic"]) == 10

    health = run.metrics["generation_health"]
    assert health["trained"]["stop_rate"] == 1.0
    assert health["baseline"]["stop_rate"] == pytest.approx(0.5, abs=0.02)
    assert health["max_new_tokens"] == 16

    assert len(run.examples) == 10
    assert all(ex["reason"] and ex["baseline"] and ex["trained"] for ex in run.examples)

    report = Report.objects.get(run=run)
    assert report.version == 1 and len(report.sha256) == 64
    assert report.metrics["perplexity"]["display"] == ppl["display"]


def test_the_report_context_carries_the_stored_figures(completed_run, fake_pdf):
    context = fake_pdf.contexts[-1]
    assert context["run"]["id"] == str(completed_run.pk)
    assert context["run"]["suites"] == {n: v["version"] for n, v in completed_run.suites.items()}
    assert (
        context["metrics"]["perplexity"]["trained"]
        == completed_run.metrics["perplexity"]["trained"]
    )
    assert context["job"]["configuration"] == completed_run.job.configuration
    assert context["approval"] is None and len(context["examples"]) == 10


def test_executing_twice_claims_once(completed_job, fake_scoring, fake_pdf, fast_settings):
    run = services.validation_run_create(job=completed_job, user=None, enqueue=False)
    first = services.validation_run_execute(run_id=str(run.pk))
    second = services.validation_run_execute(run_id=str(run.pk))
    assert first.status == RunStatus.COMPLETED and second is None
    # EI and brand voice, once each, one call per batch of EVALUATION_BATCH_SIZE prompts
    from evaluation.suites import all_suites

    size = fast_settings.EVALUATION_BATCH_SIZE
    batches = sum(-(-len(all_suites()[n].items) // size) for n in services.RUBRIC_SUITES)
    assert fake_scoring.calls.count(("generate", True)) == batches == 6
    assert Report.objects.filter(run=run).count() == 1


def test_a_running_run_is_not_claimed_again(completed_job, fake_scoring):
    run = services.validation_run_create(job=completed_job, user=None, enqueue=False)
    ValidationRun.objects.filter(pk=run.pk).update(status=RunStatus.RUNNING)
    assert services.validation_run_execute(run_id=str(run.pk)) is None
    assert fake_scoring.calls == []


def test_a_run_abandoned_by_a_dead_worker_is_claimed_again(
    completed_job, fake_scoring, fake_pdf, settings
):
    from datetime import timedelta

    from django.utils import timezone

    run = services.validation_run_create(job=completed_job, user=None, enqueue=False)
    long_ago = timezone.now() - timedelta(seconds=settings.LONG_TASK_STALE_AFTER_S + 5)
    ValidationRun.objects.filter(pk=run.pk).update(
        status=RunStatus.RUNNING, started_at=long_ago, heartbeat_at=long_ago, attempts=1
    )
    assert services.validation_run_execute(run_id=str(run.pk)).status == RunStatus.COMPLETED


def test_a_run_with_a_fresh_heartbeat_is_not_claimed_again(completed_job, fake_scoring, settings):
    from datetime import timedelta

    from django.utils import timezone

    run = services.validation_run_create(job=completed_job, user=None, enqueue=False)
    long_ago = timezone.now() - timedelta(seconds=settings.LONG_TASK_STALE_AFTER_S + 5)
    ValidationRun.objects.filter(pk=run.pk).update(
        status=RunStatus.RUNNING, started_at=long_ago, heartbeat_at=timezone.now()
    )
    assert services.validation_run_execute(run_id=str(run.pk)) is None
    assert fake_scoring.calls == []


def test_only_a_completed_job_with_an_adapter_can_be_validated(completed_job):
    from config.errors import Conflict

    completed_job.status = JobStatus.TRAINING
    completed_job.save()
    with pytest.raises(Conflict, match="completed job"):
        services.validation_run_create(job=completed_job, user=None, enqueue=False)
    completed_job.status = JobStatus.COMPLETED
    completed_job.save()
    Artifact.objects.filter(job=completed_job).delete()
    with pytest.raises(Conflict, match="no adapter"):
        services.validation_run_create(job=completed_job, user=None, enqueue=False)
    assert not ValidationRun.objects.exists()


def test_one_active_run_per_job(completed_job):
    from config.errors import Conflict

    services.validation_run_create(job=completed_job, user=None, enqueue=False)
    with pytest.raises(Conflict, match="already in progress"):
        services.validation_run_create(job=completed_job, user=None, enqueue=False)
    assert ValidationRun.objects.count() == 1


def test_a_failure_is_recorded_with_its_message(completed_job, fake_scoring, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr("evaluation.scoring.generate", broken)
    run = services.validation_run_create(job=completed_job, user=None, enqueue=False)
    run = services.validation_run_execute(run_id=str(run.pk))
    assert run.status == RunStatus.FAILED
    assert run.error_type == "RuntimeError" and "out of memory" in run.error_message
    assert run.completed_at is not None
    # Parts finished before the failure are kept.
    assert run.metrics["perplexity"]["baseline"] > 0


def test_job_completion_starts_a_validation_through_the_task(
    completed_job, fake_scoring, fake_pdf, on_commit_now
):
    run = services.validation_on_job_completed(job=completed_job)
    assert run is not None and run.trigger == ValidationRun.Trigger.AUTO
    run.refresh_from_db()
    assert run.status == RunStatus.COMPLETED
    # Only once per job.
    assert services.validation_on_job_completed(job=completed_job) is None


def test_auto_start_can_be_switched_off(completed_job, settings):
    settings.EVALUATION_AUTO_START = False
    assert services.validation_on_job_completed(job=completed_job) is None
    assert not ValidationRun.objects.exists()


def test_auto_start_never_breaks_training(db, settings):
    settings.EVALUATION_AUTO_START = True
    job = make_completed_job(name="No adapter")
    Artifact.objects.filter(job=job).delete()
    assert services.validation_on_job_completed(job=job) is None


def test_the_held_out_split_matches_the_workers(completed_job):
    from gpu.data import read_conversations, split_conversations

    raw = [
        line.decode()
        for line in __import__("tests.evaluation.core_fixtures", fromlist=["x"])
        .training_lines()
        .splitlines()
    ]
    _, expected = split_conversations(
        read_conversations(raw),
        completed_job.configuration["validation_split"],
        completed_job.configuration["hyperparameters"]["seed"],
    )
    assert services.held_out_documents(job=completed_job) == [c.messages for c in expected]


def test_the_workers_completed_event_starts_the_validation(
    db, fast_settings, monkeypatch, django_capture_on_commit_callbacks
):
    from training import services as training_services
    from training.models import TrainingJob

    started = []
    monkeypatch.setattr(
        "evaluation.tasks.execute_validation_run.delay", lambda run_id: started.append(run_id)
    )
    job = make_completed_job(name="Finishing")
    TrainingJob.objects.filter(pk=job.pk).update(status=JobStatus.FINALIZATION)
    job.refresh_from_db()
    with django_capture_on_commit_callbacks(execute=True):
        training_services._on_completed(job, {"final_metrics": {}, "perplexity": {}})
        assert started == []  # enqueued only once the transaction commits
    run = ValidationRun.objects.get(job=job)
    assert run.trigger == ValidationRun.Trigger.AUTO and run.status == RunStatus.PENDING
    assert started == [str(run.pk)]


# --- Acceptance: a real job, a real validation, a real PDF ----------------------------------


def _pdf_pages_and_text(pdf: bytes, tmp_path) -> tuple[list, str]:
    import subprocess

    from tests.evaluation.core_fixtures import require_poppler

    require_poppler()

    path = tmp_path / "report.pdf"
    path.write_bytes(pdf)
    subprocess.run(["pdftoppm", "-r", "40", "-png", str(path), str(tmp_path / "page")], check=True)
    text = subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], check=True, capture_output=True, text=True
    ).stdout
    return sorted(tmp_path.glob("page-*.png")), text


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_acceptance_a_trained_job_is_validated_on_cpu_with_a_pdf(
    live_server, settings, monkeypatch, tmp_path
):
    """A real (small) LoRA job trains on this CPU with the offline model; its completion starts
    the validation, which runs every part with the real scoring and renders the real PDF."""
    import time
    from pathlib import Path

    from config.roles import Role
    from tests.conftest import ApiClient, fetch_download
    from tests.factories import TokenFactory, UserFactory
    from tests.training.test_end_to_end import upload, wait_for

    root = Path(__file__).resolve().parents[2]
    settings.CRUCIBLE_PUBLIC_URL = live_server.url
    settings.TRAINING_LAUNCH_INLINE = True
    settings.RATELIMIT_ENABLE = False
    settings.TRAINING_MODEL_CACHE = str(root / "var" / "models")
    settings.EVALUATION_AUTO_START = True
    settings.EVALUATION_MAX_NEW_TOKENS = 8
    settings.EVALUATION_BATCH_SIZE = 40
    settings.EVALUATION_BOOTSTRAP = 300
    # The acceptance asks for responses ready for rating; judging 160 responses with the real
    # offline judge takes minutes on a CPU (it is covered by the scoring and workflow tests).
    settings.EVALUATION_JUDGE = "none"
    settings.EVALUATION_TORCH_THREADS = 1
    settings.MODEL_GATEWAY_URL = ""
    settings.HF_TOKEN = ""
    queued: list[str] = []
    # The worker's completed event enqueues the validation; the test runs the task itself.
    monkeypatch.setattr("evaluation.tasks.execute_validation_run.delay", queued.append)

    engineer = ApiClient(TokenFactory(user=UserFactory(role=Role.ENGINEER)))
    training_file = upload(engineer, root / "samples" / "training" / "financial_advisor_v1.jsonl")
    created = engineer.post(
        "training/jobs",
        json={
            "training_file_id": training_file["id"],
            "preset": "smoke",
            "name": "Acceptance",
            # Half the Smoke steps, but a real trained adapter.
            "overrides": {"max_steps": 6, "checkpoint_every_steps": 6},
            "start": True,
        },
    )
    assert created.status_code == 201, created.content
    job = wait_for(created.json()["id"], lambda j: j.is_terminal, timeout=600)
    assert job.status == JobStatus.COMPLETED, (job.error_type, job.error_message)
    [run] = ValidationRun.objects.filter(job=job)
    # The server thread enqueues right after its commit, which the poll above may just beat.
    for _ in range(100):
        if queued:
            break
        time.sleep(0.1)
    assert queued == [str(run.pk)] and run.trigger == "auto"

    from evaluation.tasks import execute_validation_run

    assert execute_validation_run(str(run.pk)) == RunStatus.COMPLETED
    run.refresh_from_db()
    metrics = run.metrics
    ppl = metrics["perplexity"]
    assert ppl["n_documents"] == 9  # 20% of 45 conversations
    assert ppl["ci_low"] is not None and ppl["ci_high"] is not None
    assert ppl["trained"] < ppl["baseline"]  # the adapter learned something
    ret = metrics["retention"]
    assert ret["n_questions"] == 100 and ret["ci_low"] is not None
    assert GeneratedResponse.objects.filter(run=run).count() == 160
    assert metrics["emotional_intelligence"]["source"] is None  # awaiting human ratings
    assert metrics["generation_health"]["baseline"]["n"] == 80
    assert len(run.examples) == 10

    analyst = ApiClient(TokenFactory(user=UserFactory(role=Role.ANALYST)))
    item = analyst.get(f"validation/runs/{run.pk}/rating-items/next")
    assert item.status_code == 200  # responses are ready for rating

    response = engineer.get(f"training/jobs/{job.pk}/download/validation-report")
    pages, text = _pdf_pages_and_text(fetch_download(response), tmp_path)
    assert len(pages) >= 2 and all(p.stat().st_size > 1000 for p in pages)
    flat = " ".join(text.split())
    for number in (
        f"{ppl['baseline']:.1f}",
        f"{ppl['trained']:.1f}",
        f"{ret['retention_pct']:.1f}",
    ):
        assert number in flat, (number, flat[:2000])
    assert str(run.pk) in flat.replace(" ", "") or str(run.pk)[:8] in flat
