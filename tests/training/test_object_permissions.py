"""Object-level permissions: an engineer changes only what they created (reading is shared);
admins change anything; the API (403 envelope) and the pages (403 page) agree."""

from __future__ import annotations

import io

import pytest
from django.test import Client
from django.urls import reverse

from config.roles import Role, can_change
from corpora.services import corpus_create
from tests.conftest import ApiClient, assert_envelope
from tests.corpora.conftest import document, jsonl
from tests.factories import TokenFactory, UserFactory
from training import services
from training.models import JobStatus, JobTemplate, TrainingJob

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner():
    return UserFactory(role=Role.ENGINEER)


@pytest.fixture
def other():
    return ApiClient(TokenFactory(user=UserFactory(role=Role.ENGINEER)))


@pytest.fixture
def admin():
    return ApiClient(TokenFactory(user=UserFactory(role=Role.ADMIN)))


@pytest.fixture
def job(owner, training_file, smollm, smoke, fake_executor):
    return services.training_job_create(
        user=owner, training_file=training_file, base_model=smollm, preset=smoke, name="mine"
    )


@pytest.fixture
def template(owner, smollm, smoke):
    return services.job_template_create(user=owner, name="tpl", base_model=smollm, preset=smoke)


def _refused(response, what: str) -> None:
    error = assert_envelope(response, 403, "permission_denied")
    assert error["message"] == f"Only the user who created {what} or an admin can change it."


JOB_WRITES = [
    ("patch", "training/jobs/{id}", {"notes": "mine now"}),
    ("delete", "training/jobs/{id}", None),
    ("post", "training/jobs/{id}/start", None),
    ("post", "training/jobs/{id}/cancel", None),
    ("post", "training/jobs/{id}/retry", None),
    ("post", "training/jobs/{id}/switch-to-on-demand", None),
]


@pytest.mark.parametrize(("method", "path", "body"), JOB_WRITES)
def test_another_engineer_cannot_change_a_job(job, other, method, path, body):
    url = path.format(id=job.pk)
    response = other.request(method.upper(), url, json=body)
    _refused(response, "this training job")
    job.refresh_from_db()
    assert job.status == JobStatus.PENDING and job.notes == ""
    assert TrainingJob.objects.count() == 1
    assert other.get(f"training/jobs/{job.pk}").status_code == 200  # reading stays shared


def test_the_creator_and_an_admin_can_change_a_job(job, owner, admin):
    mine = ApiClient(TokenFactory(user=owner))
    assert mine.patch(f"training/jobs/{job.pk}", json={"notes": "by me"}).status_code == 200
    assert admin.patch(f"training/jobs/{job.pk}", json={"notes": "by admin"}).status_code == 200
    assert admin.post(f"training/jobs/{job.pk}/start").status_code == 200
    assert mine.post(f"training/jobs/{job.pk}/cancel").status_code == 200
    job.refresh_from_db()
    assert job.notes == "by admin" and job.status == JobStatus.CANCELLED


@pytest.mark.parametrize(
    ("method", "body"), [("PATCH", {"description": "changed"}), ("DELETE", None)]
)
def test_templates_are_changed_by_their_creator_or_an_admin(
    template, owner, other, admin, method, body
):
    url = f"training/templates/{template.pk}"
    _refused(other.request(method, url, json=body), "this template")
    assert JobTemplate.objects.filter(pk=template.pk, description="").exists()
    assert other.get(url).status_code == 200
    assert ApiClient(TokenFactory(user=owner)).request(method, url, json=body).status_code in (
        200,
        204,
    )
    if method == "PATCH":
        assert admin.request(method, url, json={"description": "admin"}).status_code == 200


def test_appending_to_someone_elses_corpus_is_refused(owner, other, admin, local_storage):
    corpus = corpus_create(name="c", upload=io.BytesIO(jsonl(document(1))), user=owner)
    from django.core.files.uploadedfile import SimpleUploadedFile

    def append(client):
        return client._client.post(
            f"/api/v1/corpora/{corpus.pk}/upload",
            data={"file": SimpleUploadedFile("more.jsonl", jsonl(document(2)))},
            headers=client._headers,
        )

    _refused(append(other), "this corpus")
    corpus.refresh_from_db()
    assert corpus.record_count == 1
    assert append(admin).status_code == 201


def test_the_job_page_refuses_another_engineers_annotation(job, owner):
    client = Client()
    client.force_login(UserFactory(role=Role.ENGINEER))
    url = reverse("training:annotate", args=[job.pk])
    response = client.post(url, {"notes": "not mine", "tags": "x"})
    assert response.status_code == 403
    job.refresh_from_db()
    assert job.notes == ""
    mine = Client()
    mine.force_login(owner)
    assert mine.post(url, {"notes": "mine", "tags": "x"}).status_code == 302
    job.refresh_from_db()
    assert job.notes == "mine"


def test_the_rule_in_one_place(job, owner):
    assert can_change(owner, job)
    assert not can_change(UserFactory(role=Role.ENGINEER), job)
    assert can_change(UserFactory(role=Role.ADMIN), job)
    TrainingJob.objects.filter(pk=job.pk).update(created_by=None)
    job.refresh_from_db()
    assert can_change(UserFactory(role=Role.ENGINEER), job)  # system-made: shared


def test_the_job_page_offers_actions_and_the_notes_form_to_the_creator_only(job, owner):
    url = reverse("training:detail", args=[job.pk])
    mine = Client()
    mine.force_login(owner)
    theirs = Client()
    theirs.force_login(UserFactory(role=Role.ENGINEER))
    own_page = mine.get(url).content.decode()
    other_page = theirs.get(url).content.decode()
    annotate = reverse("training:annotate", args=[job.pk])
    assert f'action="{annotate}"' in own_page
    assert f'action="{annotate}"' not in other_page and "No notes." in other_page
