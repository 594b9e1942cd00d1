"""Downloads: adapter ZIP, metrics, deployment package; authorized, logged, signed on S3."""

import io
import json
import zipfile

import pytest

from config.roles import Role
from config.storage import storage_save, storage_uri
from tests.conftest import assert_envelope
from training import services
from training.models import Artifact, ArtifactDownload, JobStatus, MetricPoint, TrainingJob


@pytest.fixture
def completed_job(local_storage, training_file, smollm, smoke):
    job = services.training_job_create(
        user=None, training_file=training_file, base_model=smollm, preset=smoke, name="Advisor v1"
    )
    out = f"training/jobs/{job.pk}/adapter"
    storage_save(f"{out}/adapter_config.json", b'{"r": 8}')
    storage_save(f"{out}/adapter_model.safetensors", b"weights")
    storage_save(f"{out}/tokenizer/tokenizer.json", b"{}")
    TrainingJob.objects.filter(pk=job.pk).update(
        status=JobStatus.COMPLETED,
        perplexity_baseline=20.0,
        perplexity_trained=14.0,
        current_step=24,
    )
    Artifact.objects.create(job=job, kind=Artifact.Kind.ADAPTER, storage_path=out)
    for step in (1, 2):
        MetricPoint.objects.create(job=job, step=step, train_loss=3.0 / step, learning_rate=1e-3)
    assert storage_uri(out)
    return TrainingJob.objects.get(pk=job.pk)


def _zip(response) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))


def test_adapter_zip_has_the_adapter_and_a_readme_and_is_logged(api_as, completed_job):
    viewer = api_as(Role.VIEWER)
    response = viewer.get(f"training/jobs/{completed_job.pk}/download/adapters")
    assert response.status_code == 200
    assert "attachment" in response["Content-Disposition"]
    archive = _zip(response)
    assert set(archive.namelist()) == {
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer/tokenizer.json",
        "README.md",
    }
    assert "PeftModel.from_pretrained" in archive.read("README.md").decode()
    assert "30.0% improvement" in archive.read("README.md").decode()
    artifact = Artifact.objects.get(job=completed_job, kind=Artifact.Kind.ADAPTER_ZIP)
    assert artifact.download_count == 1
    download = ArtifactDownload.objects.get(artifact=artifact)
    assert download.user == viewer.user and download.request_id


def test_deployment_package_contents(api_as, completed_job):
    archive = _zip(
        api_as(Role.VIEWER).get(f"training/jobs/{completed_job.pk}/download/deployment-package")
    )
    names = set(archive.namelist())
    assert {
        "inference.py",
        "requirements.txt",
        "README.md",
        "example_prompts.json",
        "package.json",
        "adapter/adapter_config.json",
    } <= names
    prompts = json.loads(archive.read("example_prompts.json"))
    assert prompts[0]["prompt"] == "How do I save for goal 0?"
    package = json.loads(archive.read("package.json"))
    assert package["base_model"]["source"] == "offline"
    assert package["system_prompt"].startswith("You are Elena Morales")
    assert "Troubleshooting" in archive.read("README.md").decode()


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_metrics_download(api_as, completed_job, fmt):
    response = api_as(Role.VIEWER).get(
        f"training/jobs/{completed_job.pk}/download/metrics?format={fmt}"
    )
    assert response.status_code == 200
    if fmt == "json":
        assert [m["step"] for m in response.json()["metrics"]] == [1, 2]
    else:
        lines = response.content.decode().splitlines()
        assert lines[0].startswith("step,epoch,train_loss") and len(lines) == 3


def test_no_adapter_yet_is_a_conflict(api_as, training_file, smollm):
    job = services.training_job_create(
        user=None, training_file=training_file, base_model=smollm, name="x"
    )
    assert_envelope(api_as(Role.VIEWER).get(f"training/jobs/{job.pk}/download/adapters"), 409)


def test_downloads_need_a_role(api_as, anon_api, completed_job):
    assert_envelope(anon_api.get(f"training/jobs/{completed_job.pk}/download/adapters"), 401)
    assert_envelope(api_as(None).get(f"training/jobs/{completed_job.pk}/download/adapters"), 403)


def test_s3_downloads_redirect_to_an_expiring_signed_link(
    api_as, s3_storage, training_file, smollm
):
    job = services.training_job_create(
        user=None, training_file=training_file, base_model=smollm, name="s3"
    )
    out = f"training/jobs/{job.pk}/adapter"
    storage_save(f"{out}/adapter_config.json", b"{}")
    Artifact.objects.create(job=job, kind=Artifact.Kind.ADAPTER, storage_path=out)
    TrainingJob.objects.filter(pk=job.pk).update(status=JobStatus.COMPLETED)
    response = api_as(Role.VIEWER).get(f"training/jobs/{job.pk}/download/adapters")
    assert response.status_code == 302
    location = response["Location"]
    assert (
        s3_storage["bucket"] in location and "Expires=" in location
    ) or "X-Amz-Expires=600" in location
