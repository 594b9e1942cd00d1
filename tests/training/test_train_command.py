"""`manage.py train` watches only the job it started and uses only the caller's own file."""

import io
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from corpora.models import TrainingFile
from tests.factories import UserFactory
from tests.training.conftest import conversations
from training import services
from training.management.commands import train as train_command
from training.models import JobStatus, TrainingJob

S = JobStatus


def started_job(training_file, smollm, smoke, name) -> TrainingJob:
    job = services.training_job_create(
        user=None, training_file=training_file, base_model=smollm, preset=smoke, name=name
    )
    services.training_job_start(job=job, user=None)
    TrainingJob.objects.filter(pk=job.pk).update(
        last_heartbeat_at=timezone.now() - timedelta(minutes=10)
    )
    return TrainingJob.objects.get(pk=job.pk)


@pytest.mark.django_db
def test_reconcile_limited_to_one_job_leaves_the_others_alone(
    fake_executor, training_file, smollm, smoke
):
    mine = started_job(training_file, smollm, smoke, "mine")
    theirs = started_job(training_file, smollm, smoke, "dashboard job")
    summary = services.training_jobs_reconcile(job_ids=[mine.pk])
    mine.refresh_from_db()
    theirs.refresh_from_db()
    assert summary["checked"] == 1 and summary["recovered"] == 1
    assert mine.recovery_count == 1 and mine.attempt == 2
    assert theirs.recovery_count == 0 and theirs.attempt == 1  # not relaunched here
    assert theirs.status == S.PROVISIONING
    assert [launch["job_id"] for launch in fake_executor.launched].count(str(theirs.pk)) == 1
    # The scheduler's reconcile (no filter) still handles it.
    services.training_jobs_reconcile()
    theirs.refresh_from_db()
    assert theirs.recovery_count == 1


@pytest.mark.django_db
def test_the_follow_loop_reconciles_only_its_own_job(
    fake_executor, training_file, smollm, smoke, monkeypatch
):
    job = started_job(training_file, smollm, smoke, "followed")
    calls = []

    def reconcile(**kwargs):
        calls.append(kwargs)
        TrainingJob.objects.filter(pk=job.pk).update(status=S.CANCELLED)
        return {}

    monkeypatch.setattr(train_command.services, "training_jobs_reconcile", reconcile)
    monkeypatch.setattr(train_command.time, "sleep", lambda s: None)
    command = train_command.Command(stdout=io.StringIO())
    result = command._follow(job, timeout=30)
    assert result.status == S.CANCELLED
    assert calls == [{"job_ids": [job.pk]}]


@pytest.mark.django_db
def test_file_reuses_only_the_callers_own_upload(tmp_path, settings):
    settings.RATELIMIT_ENABLE = False
    path = tmp_path / "advisor.jsonl"
    path.write_bytes(conversations(5))
    alice = UserFactory(username="alice")
    bob = UserFactory(username="bob")
    from corpora.services import training_file_create

    alices = training_file_create(
        name="alice's private set", upload=io.BytesIO(path.read_bytes()), user=alice
    )

    out = io.StringIO()
    call_command("train", file=str(path), user="bob", preset="smoke", no_follow=True, stdout=out)
    text = out.getvalue()
    assert "Uploaded advisor.jsonl as training file 'advisor'" in text
    assert "5 conversations (5 assistant turns)" in text
    bobs = TrainingFile.objects.get(uploaded_by=bob)
    assert bobs.pk != alices.pk and bobs.sha256 == alices.sha256
    assert TrainingJob.objects.get(created_by=bob).training_file_id == bobs.pk
    assert "alice" not in text

    # Bob again: his own earlier upload is reused, and the output says which and whose.
    out = io.StringIO()
    call_command("train", file=str(path), user="bob", preset="smoke", no_follow=True, stdout=out)
    text = out.getvalue()
    assert f"Using training file 'advisor' ({bobs.pk}) uploaded by bob" in text
    assert TrainingFile.objects.filter(sha256=bobs.sha256).count() == 2
    assert set(
        TrainingJob.objects.filter(created_by=bob).values_list("training_file_id", flat=True)
    ) == {bobs.pk}
