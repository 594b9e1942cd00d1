"""Numbers that agree (issue 12): one validation loss labelled with its step, dataset counts
in named units, and the adapter's real size."""

import re

import pytest
from django.test import Client

from config.roles import Role
from config.storage import storage_save, storage_uri
from tests.factories import PASSWORD, UserFactory
from training import services
from training.models import Artifact, JobStatus, TrainingJob

pytestmark = pytest.mark.django_db


@pytest.fixture
def running_job(training_file, smollm, smoke, fake_executor):
    job = services.training_job_create(
        user=None, training_file=training_file, base_model=smollm, preset=smoke, name="numbers"
    )
    services.training_job_start(job=job, user=None)
    job.refresh_from_db()
    return job


def viewer() -> Client:
    client = Client()
    assert client.login(username=UserFactory(role=Role.VIEWER).username, password=PASSWORD)
    return client


def complete(job, post_event, *, val_loss=3.2010, artifacts=None):
    post_event(job, "stage", {"stage": "training"})
    for step in range(1, 13):
        data = {"step": step, "total_steps": 12, "train_loss": 3.5 - step * 0.05}
        post_event(job, "metrics", data)
    # The evaluation at step 12 (the chart's last validation point).
    post_event(job, "metrics", {"step": 12, "total_steps": 12, "val_loss": 3.034})
    post_event(
        job,
        "completed",
        {
            "artifacts": artifacts or {},
            # A worker that reports another definition (the full-split NLL) as val_loss.
            "final_metrics": {"global_step": 12, "train_loss": 2.9, "val_loss": val_loss},
            "perplexity": {"baseline": 30.0, "trained": 24.6, "improvement_pct": 18.0},
        },
    )
    return TrainingJob.objects.get(pk=job.pk)


def test_one_validation_loss_labelled_with_its_step_on_the_page_the_chart_and_the_api(
    running_job, post_event, engineer
):
    job = complete(running_job, post_event)
    assert job.status == JobStatus.COMPLETED
    assert job.final_val_loss == pytest.approx(3.034)
    assert job.latest_metrics["val_loss"] == pytest.approx(3.034)
    assert job.latest_metrics["val_loss_step"] == 12

    client = viewer()
    html = client.get(f"/training/{job.pk}/").content.decode()
    label = "Validation loss (step 12, held-out split)"
    results = html[html.index('id="job-results"') :]
    results = results[: results.index("</section>")]
    assert label in results and "3.0340" in results
    metrics = html[html.index(">Latest metrics</h2>") :]
    assert label in metrics and "3.0340" in metrics
    assert "3.201" not in results and "3.201" not in metrics[: metrics.index("</section>")]
    chart = client.get(f"/training/{job.pk}/chart/").json()
    assert chart["val"][-1] == [12, pytest.approx(3.034)]

    body = engineer.get(f"training/jobs/{job.pk}").json()
    assert body["final_val_loss"] == pytest.approx(3.034)
    assert body["latest_metrics"]["val_loss"] == body["final_val_loss"]
    assert body["latest_metrics"]["val_loss_step"] == 12


def test_the_workers_final_value_is_used_when_no_evaluation_was_logged(running_job, post_event):
    post_event(
        running_job,
        "completed",
        {
            "artifacts": {},
            "final_metrics": {"global_step": 8, "val_loss": 2.5, "val_loss_step": 8},
            "perplexity": {},
        },
    )
    job = TrainingJob.objects.get(pk=running_job.pk)
    assert job.final_val_loss == 2.5 and job.latest_metrics["val_loss_step"] == 8


def test_dataset_counts_name_their_units_on_the_job_and_the_file(
    running_job, post_event, training_file
):
    post_event(
        running_job,
        "dataset",
        {
            "conversations": 6,
            "train_conversations": 5,
            "val_conversations": 1,
            "train_examples": 5,
            "total_steps": 12,
        },
    )
    client = viewer()
    html = client.get(f"/training/{running_job.pk}/").content.decode()
    assert "6 conversations (6 assistant turns); 5 for training, 1 held out for validation" in (
        html
    )
    assert "Training examples (1 per conversation)" in html
    page = client.get(f"/datasets/training-files/{training_file.pk}/")
    assert page.status_code == 200
    text = page.content.decode()
    assert "Assistant turns" in text and "Training pairs" not in text


def test_the_adapter_artifact_reports_the_size_of_its_files(running_job, post_event, engineer):
    out = f"training/jobs/{running_job.pk}/adapter"
    storage_save(f"{out}/adapter_model.safetensors", b"\0" * 4096)
    storage_save(f"{out}/adapter_config.json", b"{}" * 50)
    storage_save(f"{out}/tokenizer/tokenizer.json", b"x" * 1000)
    job = complete(running_job, post_event, artifacts={"adapter_uri": storage_uri(out)})
    adapter = Artifact.objects.get(job=job, kind=Artifact.Kind.ADAPTER)
    assert adapter.size_bytes == 4096 + 100 + 1000
    listed = engineer.get(f"training/jobs/{job.pk}/artifacts").json()
    assert [a["size_bytes"] for a in listed if a["kind"] == "adapter"] == [5196]
    assert re.search(r"Adapter", viewer().get(f"/training/{job.pk}/").content.decode())
