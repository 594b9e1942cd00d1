"""Real training jobs, end to end, on this machine's CPU with the offline SmolLM2 model.

The platform runs in pytest-django's live server; the worker (`python -m gpu.train`) is
launched by the local executor as a real subprocess and reports back with signed webhooks.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import pytest

from config.roles import Role
from tests.conftest import ApiClient, fetch_download
from tests.factories import TokenFactory, UserFactory
from training import services
from training.models import Checkpoint, JobStatus, MetricPoint, TrainingJob

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "samples" / "training" / "financial_advisor_v1.jsonl"

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def platform(live_server, settings):
    settings.CRUCIBLE_PUBLIC_URL = live_server.url
    settings.TRAINING_LAUNCH_INLINE = True
    settings.RATELIMIT_ENABLE = False
    settings.TRAINING_MODEL_CACHE = str(ROOT / "var" / "models")
    return live_server


@pytest.fixture
def engineer_api(platform):
    return ApiClient(TokenFactory(user=UserFactory(role=Role.ENGINEER)))


def upload(api, path_or_bytes, name="sample"):
    from django.core.files.uploadedfile import SimpleUploadedFile

    content = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    response = api._client.post(
        "/api/v1/training-files",
        data={"file": SimpleUploadedFile(f"{name}.jsonl", content), "name": name},
        headers=api._headers,
    )
    assert response.status_code == 201, response.content
    return response.json()


def wait_for(job_id, predicate, timeout=900, reconcile_every=2.0):
    """Poll the job (running the scheduler's reconcile step meanwhile) until predicate holds."""
    deadline = time.monotonic() + timeout
    last = 0.0
    while time.monotonic() < deadline:
        job = TrainingJob.objects.get(pk=job_id)
        if predicate(job):
            return job
        if time.monotonic() - last > reconcile_every:
            services.training_jobs_reconcile()
            last = time.monotonic()
        time.sleep(0.5)
    job = TrainingJob.objects.get(pk=job_id)
    from training.executors import get_executor

    log = get_executor("local").logs(job_id=str(job.pk), tail=60)
    raise AssertionError(f"timed out in status {job.status} at step {job.current_step}\n{log}")


def test_smoke_job_on_the_sample_file_completes_through_the_api(
    engineer_api, tmp_path, live_server, settings, monkeypatch
):
    """Also issue 12's acceptance: the platform serves on a random port with
    CRUCIBLE_PUBLIC_URL unset, and a Smoke job started through the API over HTTP reaches
    completed without any recovery (one real Smoke run carries both claims)."""
    import requests

    from config import addresses
    from training.models import Recovery, WebhookEvent

    settings.CRUCIBLE_PUBLIC_URL = ""  # nothing tells the platform its address
    monkeypatch.setattr(addresses, "_noted", {})
    port = urlparse(live_server.url).port
    assert port != 8000
    api = f"{live_server.url}/api/v1"
    uploaded = requests.post(
        f"{api}/training-files",
        files={"file": ("sample.jsonl", SAMPLE.read_bytes())},
        data={"name": "sample"},
        headers=engineer_api._headers,
        timeout=60,
    )
    assert uploaded.status_code == 201, uploaded.text
    created = requests.post(
        f"{api}/training/jobs",
        json={
            "training_file_id": uploaded.json()["id"],
            "preset": "smoke",
            "name": "Smoke",
            "start": True,
        },
        headers=engineer_api._headers,
        timeout=120,
    )
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    job = wait_for(job_id, lambda j: j.is_terminal, timeout=2400)
    assert job.status == JobStatus.COMPLETED, (job.error_type, job.error_message)
    assert job.recovery_count == 0 and job.attempt == 1
    assert not Recovery.objects.filter(job=job).exists()
    assert "recovering" not in [t.to_status for t in job.transitions.all()]
    # The worker was told the live server's own port, and its events arrived there.
    spec = json.loads((Path(settings.DATA_DIR) / "jobs" / job_id / "spec-1.json").read_text())
    assert spec["webhook"]["url"] == f"http://127.0.0.1:{port}/api/v1/training/webhook"
    assert WebhookEvent.objects.filter(job=job, type="completed").exists()
    # The job's page shows one validation loss, labelled with its step.
    assert job.final_val_loss == job.latest_metrics["val_loss"]
    assert job.latest_metrics["val_loss_step"] <= job.current_step

    # Stages in order.
    stages = [t.to_status for t in job.transitions.all()]
    assert stages[:2] == ["queued", "provisioning"] and stages[-2:] == ["finalization", "completed"]
    assert stages.index("preprocessing") < stages.index("training")
    assert stages.index("model_loading") < stages.index("training")
    # Metrics history stored, one point per logged step up to the planned total.
    steps = list(MetricPoint.objects.filter(job=job).values_list("step", flat=True))
    assert steps[-1] == job.total_steps == job.current_step == 12
    assert MetricPoint.objects.filter(job=job, train_loss__isnull=False).count() >= 10
    assert MetricPoint.objects.filter(job=job, tokens_per_second__isnull=False).exists()
    # The adapter beats the base model on the held-out split.
    assert job.perplexity_trained < job.perplexity_baseline, (
        job.perplexity_baseline,
        job.perplexity_trained,
    )
    assert job.checkpoints.count() >= 2

    # Artifacts download; the adapter loads with peft and generates.
    response = engineer_api.get(f"training/jobs/{job.pk}/download/adapters")
    archive = zipfile.ZipFile(io.BytesIO(fetch_download(response)))
    archive.extractall(tmp_path / "zip")
    assert (tmp_path / "zip" / "adapter" / "adapter_model.safetensors").exists()
    metrics = engineer_api.get(f"training/jobs/{job.pk}/download/metrics?format=json").json()
    assert len(metrics["metrics"]) == len(steps)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = next(
        p
        for p in (ROOT / "var" / "models").iterdir()
        if p.is_dir() and (p / "config.json").exists()
    )
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "zip" / "adapter")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "zip" / "adapter"
    )
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How do I start an emergency fund?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(
        output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True
    ).strip()

    # The deployment package's inference.py runs and answers.
    package = engineer_api.get(f"training/jobs/{job.pk}/download/deployment-package")
    zipfile.ZipFile(io.BytesIO(fetch_download(package))).extractall(tmp_path / "pkg")
    result = subprocess.run(
        [
            sys.executable,
            "inference.py",
            "--prompt",
            "Should I pay off debt or save first?",
            "--max-new-tokens",
            "16",
        ],
        cwd=tmp_path / "pkg",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()


def test_a_killed_worker_resumes_from_its_checkpoint_and_completes(engineer_api):
    from tests.training.conftest import shrink_smoke_preset

    # Six short steps, a checkpoint every two: killed after the first, resumed from it.
    shrink_smoke_preset(max_steps=6)
    training_file = upload(engineer_api, SAMPLE)
    job_id = engineer_api.post(
        "training/jobs",
        json={
            "training_file_id": training_file["id"],
            "preset": "smoke",
            "name": "Kill me",
            "start": True,
        },
    ).json()["id"]
    wait_for(job_id, lambda j: Checkpoint.objects.filter(job=j).exists() or j.is_terminal)
    job = TrainingJob.objects.get(pk=job_id)
    assert not job.is_terminal
    first_checkpoint = Checkpoint.objects.filter(job=job).order_by("step").first().step
    pid = int(job.executor_ref.split(":")[0])
    os.kill(pid, signal.SIGKILL)

    job = wait_for(job_id, lambda j: j.is_terminal)
    assert job.status == JobStatus.COMPLETED, (job.error_type, job.error_message)
    assert job.recovery_count == 1
    assert job.recovery_summary == "Interrupted 1x, resumed successfully"
    recovery = job.recoveries.get()
    assert recovery.from_step >= first_checkpoint and recovery.relaunch_seconds is not None
    check = job.resume_check
    assert check["passed"] is True, check
    assert check["resumed_from_step"] == recovery.from_step
    assert job.current_step == job.total_steps == 6
    assert job.attempt == 2


def test_a_broken_row_fails_before_training_with_row_and_field(engineer_api):
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:8]]
    rows[4] = {
        "id": "broken",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Still there?"},
        ],
    }
    content = "".join(json.dumps(r) + "\n" for r in rows).encode()
    training_file = upload(engineer_api, content, name="broken")
    # The upload already names the problem, and starting a job with the file is refused.
    assert training_file["status"] == "problems"
    assert training_file["validation_errors"][0]["line"] == 5
    refused = engineer_api.post(
        "training/jobs", json={"training_file_id": training_file["id"], "preset": "smoke"}
    )
    assert refused.status_code == 422 and "line 5" in refused.json()["error"]["message"]
    # A file that slipped past the upload check is stopped by the worker's own checks.
    from corpora.models import TrainingFile

    TrainingFile.objects.filter(pk=training_file["id"]).update(status="ready", validation_errors=[])
    job_id = engineer_api.post(
        "training/jobs",
        json={"training_file_id": training_file["id"], "preset": "smoke", "start": True},
    ).json()["id"]
    job = wait_for(job_id, lambda j: j.is_terminal, timeout=300)
    assert job.status == JobStatus.FAILED and job.error_type == "DatasetFormatError"
    assert job.error_details.get("row") == 5 and job.error_details.get("field"), job.error_details
    assert "5" in job.error_message
    assert not MetricPoint.objects.filter(job=job).exists()
    assert "training" not in [t.to_status for t in job.transitions.all()]


def test_simulated_out_of_memory_gives_a_typed_error_and_a_smaller_retry(engineer_api, monkeypatch):
    monkeypatch.setenv("CRUCIBLE_SIMULATE_ERROR", "oom")
    training_file = upload(engineer_api, SAMPLE)
    job_id = engineer_api.post(
        "training/jobs",
        json={"training_file_id": training_file["id"], "preset": "smoke", "start": True},
    ).json()["id"]
    job = wait_for(job_id, lambda j: j.is_terminal, timeout=300)
    assert job.status == JobStatus.FAILED and job.error_type == "OutOfMemoryError"
    assert "micro_batch_size=1" in job.error_details["fix"]
    monkeypatch.delenv("CRUCIBLE_SIMULATE_ERROR")
    retry = engineer_api.post(f"training/jobs/{job.pk}/retry").json()
    assert {"field": "micro_batch_size", "old": 2, "new": 1} in retry["retry_changes"]
    assert retry["configuration"]["hyperparameters"]["gradient_accumulation_steps"] == 2
    cancelled = engineer_api.post(f"training/jobs/{retry['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
