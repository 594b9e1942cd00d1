"""Job templates: save a job as a template, list them, start jobs from them (page and API)."""

from __future__ import annotations

import io
import uuid

import pytest

from config.roles import Role
from corpora.models import TrainingFile
from corpora.services import training_file_create
from tests.conftest import assert_envelope
from tests.training.conftest import conversations
from tests.training.test_pages import completed_job, failed_oom_job, signed_in
from training import services
from training.models import JobStatus, JobTemplate, TrainingJob


@pytest.fixture
def done(training_file, smollm, smoke):
    job = completed_job(training_file, smollm, smoke, name="Advisor v3")
    config = {**job.configuration}
    config["hyperparameters"] = {**config["hyperparameters"], "lora_r": 24, "lora_alpha": 48}
    TrainingJob.objects.filter(pk=job.pk).update(
        configuration=config, notes="lr sweep winner", gpu_type="h100-pcie-80gb"
    )
    return TrainingJob.objects.get(pk=job.pk)


@pytest.fixture
def template(done):
    return services.job_template_from_job(job=done, user=None, name="Advisor production")


def _newer_file(name="advisor-newer"):
    return training_file_create(name=name, upload=io.BytesIO(conversations(8)), user=None)


# --- Services --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_saved_template_reproduces_the_jobs_configuration(done, template, fake_executor):
    assert template.preset == done.preset and template.base_model == done.base_model
    assert template.training_file == done.training_file
    assert template.overrides["lora_r"] == 24 and template.overrides["lora_alpha"] == 48
    assert "learning_rate" not in template.overrides  # same as the preset: not an override
    assert template.notes == "lr sweep winner" and template.tags == ["advisor", "prod"]
    assert template.gpu_type == "h100-pcie-80gb" and template.source_job == done

    job = services.job_template_start(template=template, user=None)
    job.refresh_from_db()
    assert job.configuration == done.configuration
    assert job.training_file == done.training_file
    assert job.status == JobStatus.PROVISIONING  # started and launched (fake executor)
    assert job.name.startswith("Advisor production · ")
    assert fake_executor.launched[0]["job_id"] == str(job.pk)
    template.refresh_from_db()
    assert template.use_count == 1 and template.last_used_at is not None


@pytest.mark.django_db
def test_failed_jobs_and_duplicate_names_are_refused(training_file, smollm, smoke, template):
    failed = failed_oom_job(training_file, smollm, smoke)
    with pytest.raises(Exception, match="did not fail"):
        services.job_template_from_job(job=failed, user=None, name="From a failure")
    with pytest.raises(Exception, match="exists already"):
        services.job_template_from_job(
            job=template.source_job, user=None, name="advisor PRODUCTION"
        )
    with pytest.raises(Exception, match="name"):
        services.job_template_from_job(job=template.source_job, user=None, name="   ")
    assert JobTemplate.objects.count() == 1


@pytest.mark.django_db
def test_starting_on_a_file_with_problems_writes_nothing(template, fake_executor):
    bad = _newer_file("broken")
    TrainingFile.objects.filter(pk=bad.pk).update(
        status=TrainingFile.Status.PROBLEMS,
        validation_errors=[{"line": 3, "message": "ends on a user turn"}],
    )
    bad.refresh_from_db()
    before = TrainingJob.objects.count()
    with pytest.raises(Exception, match="line 3: ends on a user turn"):
        services.job_template_start(template=template, user=None, training_file=bad)
    assert TrainingJob.objects.count() == before
    template.refresh_from_db()
    assert template.use_count == 0


@pytest.mark.django_db
def test_the_default_file_is_the_templates_own_or_the_newest_ready(template):
    assert services.job_template_default_file(template=template) == template.training_file
    newer = _newer_file()
    JobTemplate.objects.filter(pk=template.pk).update(training_file=None)
    template.refresh_from_db()
    assert services.job_template_default_file(template=template) == newer


# --- API -------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_template_crud_and_start_through_the_api(done, api_as, fake_executor):
    api = api_as(Role.ENGINEER)
    response = api.post(
        f"training/jobs/{done.pk}/save-template",
        json={"name": "Team default", "description": "the one we ship"},
    )
    assert response.status_code == 201, response.content
    template = response.json()
    assert template["preset"] == "smoke" and template["overrides"]["lora_r"] == 24
    assert template["training_file_id"] == str(done.training_file_id)
    assert template["created_by"] == api.user.username

    created = api.post(
        "training/templates",
        json={"name": "Bigger rank", "preset": "smoke", "overrides": {"lora_r": 64}},
    )
    assert created.status_code == 201, created.content
    assert created.json()["training_file_id"] is None

    listed = api_as(Role.VIEWER).get("training/templates").json()
    assert [t["name"] for t in listed] == ["Bigger rank", "Team default"]

    patched = api.patch(
        f"training/templates/{template['id']}", json={"name": "Team default v2", "tags": ["Prod"]}
    )
    assert patched.status_code == 200 and patched.json()["tags"] == ["prod"]

    # No file in the template and none given: a clear error, no job.
    before = TrainingJob.objects.count()
    response = api.post(f"training/templates/{created.json()['id']}/start", json={})
    error = assert_envelope(response, 422, "validation_error")
    assert "training file" in error["message"]
    assert TrainingJob.objects.count() == before

    started = api.post(
        f"training/templates/{created.json()['id']}/start",
        json={"training_file_id": str(done.training_file_id), "name": "r64 try"},
    )
    assert started.status_code == 201, started.content
    job = started.json()
    assert job["name"] == "r64 try" and job["configuration"]["hyperparameters"]["lora_r"] == 64
    assert job["status"] == "provisioning"

    pending = api.post(f"training/templates/{template['id']}/start", json={"start": False})
    assert pending.status_code == 201 and pending.json()["status"] == "pending"

    assert api.request("DELETE", f"training/templates/{template['id']}").status_code == 204
    assert_envelope(api.get(f"training/templates/{template['id']}"), 404, "not_found")
    # Jobs started from it stay.
    assert TrainingJob.objects.filter(pk=pending.json()["id"]).exists()


@pytest.mark.django_db
def test_template_api_bad_input_writes_nothing(done, template, api_as):
    api = api_as(Role.ENGINEER)
    cases = [
        ("training/templates", {"name": "x", "overrides": {"lora_r": 0}}, "lora_r"),
        ("training/templates", {"name": "x", "overrides": {"nonsense": 1}}, "nonsense"),
        ("training/templates", {"name": "x", "preset": "nope"}, "preset"),
        ("training/templates", {"name": "x", "base_model": "gpt-9"}, "gpt-9"),
        ("training/templates", {"name": "x", "training_file_id": str(uuid.uuid4())}, "file"),
        ("training/templates", {"name": ""}, "name"),
        (f"training/jobs/{done.pk}/save-template", {"name": "Advisor production"}, "exists"),
        (f"training/jobs/{uuid.uuid4()}/save-template", {"name": "y"}, "No training job"),
        (
            f"training/templates/{template.pk}/start",
            {"training_file_id": str(uuid.uuid4())},
            "training file",
        ),
    ]
    jobs, templates = TrainingJob.objects.count(), JobTemplate.objects.count()
    for path, payload, needle in cases:
        response = api.post(path, json=payload)
        assert response.status_code in (404, 409, 422), (path, payload, response.content)
        assert needle.lower() in response.content.decode().lower(), (payload, response.content)
    assert (TrainingJob.objects.count(), JobTemplate.objects.count()) == (jobs, templates)


@pytest.mark.django_db
def test_template_api_roles(done, template, api_as, anon_api):
    viewer = api_as(Role.VIEWER)
    assert viewer.get("training/templates").status_code == 200
    assert viewer.get(f"training/templates/{template.pk}").status_code == 200
    writes = [
        ("POST", "training/templates", {"name": "v"}),
        ("POST", f"training/jobs/{done.pk}/save-template", {"name": "v"}),
        ("PATCH", f"training/templates/{template.pk}", {"name": "v"}),
        ("DELETE", f"training/templates/{template.pk}", None),
        ("POST", f"training/templates/{template.pk}/start", {}),
    ]
    for method, path, payload in writes:
        assert_envelope(viewer.request(method, path, json=payload), 403, "permission_denied")
        assert_envelope(anon_api.request(method, path, json=payload), 401)
    assert_envelope(anon_api.get("training/templates"), 401)
    assert JobTemplate.objects.count() == 1 and template.use_count == 0


# --- Pages -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_save_as_template_from_the_job_page(done):
    client, user = signed_in(Role.ENGINEER)
    form = client.get(f"/training/{done.pk}/save-template/")
    html = form.content.decode()
    assert form.status_code == 200 and 'name="name"' in html and "Advisor v3 template" in html
    assert "<code>lora_r</code>" in html

    response = client.post(
        f"/training/{done.pk}/save-template/",
        {"name": "Advisor production", "description": "ship it", "include_training_file": "on"},
    )
    template = JobTemplate.objects.get()
    assert response.status_code == 302
    assert (
        response["Location"] == f"/training/templates/?saved={template.pk}#template-{template.pk}"
    )
    assert template.created_by == user and template.training_file == done.training_file
    html = client.get(response["Location"]).content.decode()
    assert "Saved template “Advisor production”" in html
    assert 'class="card template-card is-new"' in html

    # Without the file: whoever starts it picks one.
    client.post(
        f"/training/{done.pk}/save-template/", {"name": "Any file", "file_choice_shown": "1"}
    )
    assert JobTemplate.objects.get(name="Any file").training_file is None
    # The job page's short form (a name only) keeps the job's file.
    client.post(f"/training/{done.pk}/save-template/", {"name": "Short form"})
    assert JobTemplate.objects.get(name="Short form").training_file == done.training_file


@pytest.mark.django_db
def test_save_as_template_validation_and_roles(done, template):
    client, _ = signed_in(Role.ENGINEER)
    response = client.post(f"/training/{done.pk}/save-template/", {"name": ""})
    assert response.status_code == 400
    html = response.content.decode()
    assert "Give the template a name." in html and 'aria-invalid="true"' in html
    response = client.post(f"/training/{done.pk}/save-template/", {"name": "Advisor production"})
    assert response.status_code == 400 and "That name is taken." in response.content.decode()

    viewer, _ = signed_in(Role.VIEWER)
    html = viewer.get(f"/training/{done.pk}/save-template/").content.decode()
    assert "Only engineers and admins can save templates." in html and 'name="name"' not in html
    assert viewer.post(f"/training/{done.pk}/save-template/", {"name": "v"}).status_code == 403
    assert client.get(f"/training/{uuid.uuid4()}/save-template/").status_code == 404
    assert JobTemplate.objects.count() == 1


@pytest.mark.django_db
def test_templates_page_states(done, template):
    viewer, _ = signed_in(Role.VIEWER)
    html = viewer.get("/training/templates/").content.decode()
    assert "Advisor production" in html and "<code>lora_r</code> 24" in html
    assert "h100-pcie-80gb" in html and "Engineers and admins start jobs from them" in html
    assert "hx-delete" not in html and "start-template" not in html

    engineer, _ = signed_in(Role.ENGINEER)
    html = engineer.get("/training/templates/").content.decode()
    # The template names a ready file: Start is one POST.
    assert f'action="/training/templates/{template.pk}/start/"' in html
    assert f'name="training_file" value="{done.training_file_id}"' in html
    assert f'hx-delete="/api/v1/training/templates/{template.pk}"' in html

    JobTemplate.objects.all().delete()
    html = engineer.get("/training/templates/").content.decode()
    assert "No templates yet" in html


@pytest.mark.django_db
def test_start_from_a_template_page(done, template, fake_executor):
    newer = _newer_file()
    JobTemplate.objects.filter(pk=template.pk).update(training_file=None)
    client, user = signed_in(Role.ENGINEER)
    html = client.get(f"/training/templates/{template.pk}/start/").content.decode()
    # No file in the template: the newest ready one is preselected.
    assert f'<option value="{newer.pk}" selected>' in html
    assert "Start training" in html

    response = client.post(
        f"/training/templates/{template.pk}/start/",
        {"training_file": str(newer.pk), "name": "From the page"},
    )
    job = TrainingJob.objects.get(name="From the page")
    assert response.status_code == 302 and response["Location"] == f"/training/{job.pk}/"
    assert job.training_file == newer and job.created_by == user
    assert job.status == JobStatus.PROVISIONING

    # A file that does not exist: the form again, with the error, and no job.
    before = TrainingJob.objects.count()
    response = client.post(
        f"/training/templates/{template.pk}/start/", {"training_file": str(uuid.uuid4())}
    )
    assert response.status_code == 400 and "no longer exists" in response.content.decode()
    response = client.post(f"/training/templates/{template.pk}/start/", {"training_file": ""})
    assert response.status_code == 422 and "Choose a training file" in response.content.decode()
    assert TrainingJob.objects.count() == before

    viewer, _ = signed_in(Role.VIEWER)
    html = viewer.get(f"/training/templates/{template.pk}/start/").content.decode()
    assert "Only engineers and admins can start training jobs." in html
    assert "Start training" not in html
    response = viewer.post(
        f"/training/templates/{template.pk}/start/", {"training_file": str(newer.pk)}
    )
    assert response.status_code == 403
    assert TrainingJob.objects.count() == before
    assert client.get("/training/templates/999999/start/").status_code == 404


@pytest.mark.django_db
def test_templates_page_queries_do_not_grow(done, django_assert_max_num_queries):
    client, _ = signed_in(Role.ENGINEER)
    for i in range(2):
        services.job_template_from_job(job=done, user=None, name=f"t{i}")
    with django_assert_max_num_queries(8):
        assert client.get("/training/templates/").status_code == 200
    for i in range(2, 30):
        services.job_template_from_job(job=done, user=None, name=f"t{i}")
    with django_assert_max_num_queries(8):
        assert client.get("/training/templates/").status_code == 200
