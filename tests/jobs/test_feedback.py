"""Feedback on chat responses (POST /v1/feedback and the pages), its analysis, training files
made from it (corpora's validator, versions, lineage) and the Smoke job started from one; the
slow test runs that job for real and sees its adapter appear in /v1/models."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
from django.test import Client

from config.roles import Role
from corpora.models import TrainingFile
from jobs import serving
from jobs.models import ChatResponse, Feedback, FeedbackTrainingFile
from tests.conftest import assert_envelope
from tests.factories import UserFactory

BASE = "offline/smollm2-135m-instruct"


def response(n: int = 0, *, answer: str = "Save a little every month.", user=None):
    return ChatResponse.objects.create(
        user=user,
        source=ChatResponse.Source.CHAT,
        request_id=f"req-{n}",
        model_key=BASE,
        messages=[
            {"role": "system", "content": "You are a careful advisor."},
            {"role": "user", "content": f"How do I save for goal {n}?"},
        ],
        answer=answer,
        finish_reason="stop",
        prompt_tokens=20,
        completion_tokens=8,
        cost=Decimal(0),
    )


# --- POST /v1/feedback --------------------------------------------------------------------------


@pytest.mark.django_db
def test_feedback_is_stored_with_its_response(api_as):
    client = api_as(Role.ANALYST)
    r = response()
    created = client.post(
        "/v1/feedback",
        json={
            "response_id": r.pk,
            "thumb": -1,
            "rating": 2,
            "tags": ["Too-Long", "wrong", "wrong"],
            "corrected_answer": " Automate a transfer on payday. ",
        },
    )
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["tags"] == ["too-long", "wrong"]
    item = Feedback.objects.get(pk=body["id"])
    assert (item.response_id, item.thumb, item.rating) == (r.pk, -1, 2)
    assert item.corrected_answer == "Automate a transfer on payday."
    assert item.user == client.user


@pytest.mark.django_db
@pytest.mark.parametrize(
    "payload,status,needle",
    [
        ({"rating": 7}, 422, "rating"),
        ({"thumb": 3}, 422, "thumb"),
        ({}, 422, "thumb, a rating"),
        ({"tags": ["x" * 50]}, 422, "tags"),
    ],
)
def test_bad_feedback_is_refused_and_writes_nothing(api_as, payload, status, needle):
    r = response()
    error = assert_envelope(
        api_as(Role.ENGINEER).post("/v1/feedback", json={"response_id": r.pk, **payload}), status
    )
    assert needle in error["message"]
    assert not Feedback.objects.exists()


@pytest.mark.django_db
def test_feedback_on_an_unknown_response_is_404(api_as):
    assert_envelope(
        api_as(Role.ENGINEER).post("/v1/feedback", json={"response_id": 999, "rating": 5}), 404
    )


# --- Training files from feedback ----------------------------------------------------------------


@pytest.mark.django_db
def test_feedback_becomes_a_validated_versioned_training_file_with_lineage():
    user = UserFactory(role=Role.ENGINEER)
    corrected = serving.feedback_create(
        response=response(1), user=user, rating=1, corrected_answer="Automate it on payday."
    )
    liked = serving.feedback_create(response=response(2), user=user, thumb=1, rating=5)
    disliked = serving.feedback_create(response=response(3), user=user, thumb=-1)
    lineage = serving.feedback_training_file_create(
        feedback_ids=[corrected.pk, liked.pk, disliked.pk], user=user
    )
    assert lineage.version == 1
    assert set(lineage.feedback.all()) == {corrected, liked}  # the thumbed-down one teaches nothing
    tf = lineage.training_file
    assert tf.status == TrainingFile.Status.READY and tf.conversation_count == 2
    from config.storage import storage_read

    lines = storage_read(tf.storage_path).decode().splitlines()
    import json

    first = json.loads(lines[0])
    assert first["id"] == f"feedback-{corrected.pk}"
    assert first["messages"][-1] == {"role": "assistant", "content": "Automate it on payday."}
    assert first["messages"][0]["role"] == "system"
    again = serving.feedback_training_file_create(feedback_ids=[liked.pk], user=user)
    assert again.version == 2 and again.training_file.pk != tf.pk


@pytest.mark.django_db
def test_feedback_that_teaches_nothing_makes_no_file():
    user = UserFactory(role=Role.ENGINEER)
    down = serving.feedback_create(response=response(1), user=user, thumb=-1, rating=2)
    with pytest.raises(serving.InvalidInput):
        serving.feedback_training_file_create(feedback_ids=[down.pk], user=user)
    with pytest.raises(serving.NotFound):
        serving.feedback_training_file_create(feedback_ids=[12345], user=user)
    assert not TrainingFile.objects.exists() and not FeedbackTrainingFile.objects.exists()


# --- Pages -----------------------------------------------------------------------------------------


def signed_in(role):
    client = Client()
    user = UserFactory(role=role)
    client.force_login(user)
    return client, user


@pytest.mark.django_db
def test_pages_need_a_sign_in():
    for url in ("/chat/", "/chat/feedback/"):
        r = Client().get(url)
        assert r.status_code == 302 and "/login/" in r["Location"]


@pytest.mark.django_db
def test_chat_page_lists_models_adapters_and_profiles():
    from jobs.models import Provider, RegisteredModel

    RegisteredModel.objects.create(
        provider=Provider.objects.get(slug="offline"),
        remote_id="crucible-00000000-0000-0000-0000-000000000000",
        capabilities=["chat"],
        parent=BASE,
        display_name="Orphan adapter",
        price_input_per_m=0,
        price_output_per_m=0,
    )
    client, _ = signed_in(Role.ENGINEER)
    page = client.get("/chat/").content.decode()
    assert 'value="offline/smollm2-135m-instruct"' in page
    assert "all-minilm" not in page  # embeddings are not chat models
    assert 'label="Trained adapters (by job)"' in page and "Orphan adapter" in page
    assert "balanced@v1" in page and "json-facts@v1" in page
    assert 'id="send"' in page and "js/chat.js" in page
    viewer, _ = signed_in(Role.VIEWER)
    page = viewer.get("/chat/").content.decode()
    assert 'data-testid="chat-role"' in page and 'id="send" disabled' in page


@pytest.mark.django_db
def test_feedback_page_analysis_and_query_count(django_assert_max_num_queries):
    user = UserFactory(role=Role.ENGINEER)
    for i in range(6):
        serving.feedback_create(
            response=response(i, answer=f"answer {i}"),
            user=user,
            rating=1 + i % 5,
            tags=["helpful"] if i % 2 else ["wrong"],
        )
    client, _ = signed_in(Role.VIEWER)
    with django_assert_max_num_queries(25):
        page = client.get("/chat/feedback/").content.decode()
    assert 'data-testid="per-model"' in page and BASE in page
    assert "helpful · 3" in page and "wrong · 3" in page
    assert 'data-testid="worst"' in page
    assert "Make a training file" not in page  # a viewer reads only
    r = client.post("/chat/feedback/", {"feedback": ["1"], "action": "file"})
    assert r.status_code == 403 and not TrainingFile.objects.exists()


@pytest.mark.django_db
def test_make_a_training_file_and_start_a_smoke_job_from_the_page(monkeypatch):
    from training import services as training_services
    from training.models import JobStatus, TrainingJob

    queued = []
    monkeypatch.setattr(training_services, "_enqueue_launch", lambda job: queued.append(job.pk))
    client, user = signed_in(Role.ENGINEER)
    items = [serving.feedback_create(response=response(i), user=user, rating=5) for i in range(3)]
    r = client.post("/chat/feedback/", {"feedback": [str(f.pk) for f in items], "action": "file"})
    assert r.status_code == 302
    lineage = FeedbackTrainingFile.objects.get()
    assert lineage.version == 1 and lineage.feedback.count() == 3
    r = client.post("/chat/feedback/", {"feedback": [str(items[0].pk)], "action": "train"})
    job = TrainingJob.objects.get()
    assert r.status_code == 302 and r["Location"].endswith(f"/training/{job.pk}/")
    assert job.status == JobStatus.QUEUED and job.preset.key == "smoke"
    assert job.training_file == FeedbackTrainingFile.objects.get(version=2).training_file
    assert queued == [job.pk]
    r = client.post("/chat/feedback/", {"action": "file"})
    assert r.status_code == 302 and FeedbackTrainingFile.objects.count() == 2


# --- Slow: feedback to a trained adapter in /v1/models ---------------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_feedback_to_training_file_to_smoke_job_that_completes(live_server, settings, api_as):
    from pathlib import Path

    from tests.training.test_end_to_end import wait_for
    from training.models import JobStatus

    root = Path(__file__).resolve().parents[2]
    settings.CRUCIBLE_PUBLIC_URL = live_server.url
    settings.TRAINING_LAUNCH_INLINE = True
    settings.RATELIMIT_ENABLE = False
    settings.TRAINING_MODEL_CACHE = str(root / "var" / "models")
    user = UserFactory(role=Role.ENGINEER)
    items = [
        serving.feedback_create(
            response=response(i, user=user),
            user=user,
            rating=2,
            corrected_answer=f"For goal {i}, automate a monthly transfer and review it yearly.",
        )
        for i in range(12)
    ]
    # The product path starts the Smoke preset; here it is cut to two short steps.
    from tests.training.conftest import shrink_smoke_preset

    shrink_smoke_preset(max_steps=2)
    lineage = serving.feedback_training_file_create(feedback_ids=[f.pk for f in items], user=user)
    job = serving.feedback_training_job_start(lineage=lineage, user=user)
    assert job.preset.key == "smoke" and job.configuration["hyperparameters"]["max_steps"] == 2
    started = time.monotonic()
    job = wait_for(job.pk, lambda j: j.is_terminal)
    assert job.status == JobStatus.COMPLETED, (job.error_type, job.error_message)
    assert job.training_file_id == lineage.training_file_id
    # the adapter was registered when the job completed: /v1/models lists it on its base
    listed = {m["id"]: m for m in api_as(Role.VIEWER).get("/v1/models").json()["data"]}
    adapter = listed[f"offline/crucible-{job.pk}"]
    assert adapter["parent"] == BASE and adapter["revision"].startswith("sha256:")
    print(f"feedback -> smoke job completed in {time.monotonic() - started:.0f} s")
