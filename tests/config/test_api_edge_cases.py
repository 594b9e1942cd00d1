"""Regression tests for what the API fuzzing (tests/config/test_fuzz.py) found: each was a 500,
an undocumented status or a request the schema and the behaviour disagreed on."""

from __future__ import annotations

import io

import pytest

from config.api import api
from config.roles import Role
from corpora.services import training_file_create
from tests.conftest import assert_envelope
from tests.training.conftest import conversations
from training import services
from training.models import BaseModel, Preset, TrainingJob, WebhookEvent


@pytest.fixture
def engineer(api_as):
    return api_as(Role.ENGINEER)


@pytest.fixture
def job(engineer):
    training_file = training_file_create(
        name="advisor", upload=io.BytesIO(conversations()), user=engineer.user
    )
    return services.training_job_create(
        user=engineer.user,
        training_file=training_file,
        base_model=BaseModel.objects.get(name="SmolLM2-135M-Instruct"),
        preset=Preset.objects.get(key="smoke"),
        name="edge",
    )


@pytest.fixture
def template(engineer):
    response = engineer.post("training/templates", json={"name": "tpl", "preset": "smoke"})
    assert response.status_code == 201, response.content
    return response.json()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "path",
    ["training/jobs", "training-files", "corpora", "users", "training/jobs?tag=demo"],
)
def test_a_huge_page_number_is_a_422_not_a_500(engineer, admin_api, path):
    client = admin_api if path == "users" else engineer
    joiner = "&" if "?" in path else "?"
    response = client.get(f"{path}{joiner}page=99999999999999999999")
    assert_envelope(response, 422, "validation_error")
    assert client.get(f"{path}{joiner}page=1000000").status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize("field", ["tags", "name", "notes", "description"])
def test_null_in_a_job_patch_is_refused_and_changes_nothing(engineer, job, field):
    response = engineer.patch(f"training/jobs/{job.id}", json={field: None})
    body = assert_envelope(response, 422, "validation_error")
    assert field in body["message"]
    job.refresh_from_db()
    assert job.name == "edge"
    assert job.tags == []


@pytest.mark.django_db
@pytest.mark.parametrize("field", ["tags", "name", "notes", "description"])
def test_null_in_a_template_patch_is_refused(engineer, template, field):
    response = engineer.patch(f"training/templates/{template['id']}", json={field: None})
    assert_envelope(response, 422, "validation_error")
    assert engineer.get(f"training/templates/{template['id']}").json()["name"] == "tpl"


@pytest.mark.django_db
def test_a_json_array_as_a_patch_body_is_refused(engineer, job):
    response = engineer.patch(f"training/jobs/{job.id}", json=[{"name": "x"}])
    assert_envelope(response, 400, "bad_request")
    job.refresh_from_db()
    assert job.name == "edge"


@pytest.mark.django_db
def test_a_body_that_is_not_json_is_a_documented_400(engineer, job):
    response = engineer.request(
        "PATCH", f"training/jobs/{job.id}", data="{not json", content_type="application/json"
    )
    assert_envelope(response, 400, "bad_request")


@pytest.mark.django_db
@pytest.mark.parametrize("value", ["0.5", "1700000000", "-3"])
def test_a_bare_number_is_not_a_date(engineer, value):
    response = engineer.get(f"training/jobs?created_before={value}")
    body = assert_envelope(response, 422, "validation_error")
    assert "ISO 8601" in body["message"]
    assert engineer.get("training/jobs?created_before=2026-01-01T00:00:00Z").status_code == 200


@pytest.mark.django_db
def test_a_json_body_over_the_limit_is_a_413(engineer, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = engineer.post("training/jobs", json={"name": "x" * 2000})
    body = assert_envelope(response, 413, "payload_too_large")
    assert body["details"] == {"limit_bytes": 1000}
    assert not TrainingJob.objects.exists()


@pytest.mark.django_db
def test_the_webhook_checks_size_before_signature_and_logs_no_traceback(anon_api, settings, caplog):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    big = {"job_id": "x", "padding": "y" * 2000}
    with caplog.at_level("WARNING", logger="crucible.api"):
        unsigned = anon_api.post("training/webhook", json=big)
        signed_badly = anon_api.post(
            "training/webhook", json=big, headers={"X-Crucible-Signature": "nope"}
        )
    assert_envelope(unsigned, 413, "payload_too_large")
    assert_envelope(signed_badly, 413, "payload_too_large")
    assert not [r for r in caplog.records if r.exc_info]
    assert not WebhookEvent.objects.exists()


@pytest.mark.django_db
def test_a_multipart_upload_without_a_boundary_is_a_400(engineer):
    response = engineer.request(
        "POST", "training-files", data=b"--x\r\n", content_type="multipart/form-data"
    )
    body = assert_envelope(response, 400, "bad_request")
    assert "multipart" in body["message"]


@pytest.mark.django_db
def test_every_operation_documents_the_common_error_statuses():
    schema = api.get_openapi_schema()
    operations = [
        (path, method, op)
        for path, item in schema["paths"].items()
        for method, op in item.items()
        if isinstance(op, dict) and "responses" in op
    ]
    assert len(operations) > 50
    for path, method, op in operations:
        codes = {int(code) for code in op["responses"]}
        assert {400, 401, 413, 422, 429} <= codes, (method, path, sorted(codes))


@pytest.mark.django_db
def test_the_schema_states_the_page_bound_and_non_null_patch_fields():
    schema = api.get_openapi_schema()
    params = schema["paths"]["/api/v1/training/jobs"]["get"]["parameters"]
    page = next(p for p in params if p["name"] == "page")
    assert page["schema"]["maximum"] == 1_000_000
    patch = schema["components"]["schemas"]["JobPatch"]["properties"]
    assert patch["name"] == {
        "maxLength": 255,
        "minLength": 1,
        "title": "Name",
        "type": "string",
    }
    assert patch["tags"]["type"] == "array"


@pytest.mark.django_db
def test_nul_characters_in_a_json_body_are_a_422_and_nothing_is_written(engineer, job):
    before = job.name
    response = engineer.patch(f"training/jobs/{job.pk}", json={"name": "a\u0000b"})
    error = assert_envelope(response, 422)
    assert "NUL" in error["message"]
    job.refresh_from_db()
    assert job.name == before


@pytest.mark.django_db
@pytest.mark.parametrize("offset", ["+17:11", "-23:59", "+00:00"])
def test_any_iso_offset_filters_jobs_in_utc(engineer, job, offset):
    """PostgreSQL stores offsets up to +-15:59 only: the filter compares in UTC (a 500 once)."""
    encoded = offset.replace("+", "%2B")
    response = engineer.get(f"training/jobs?created_before=2999-09-16T12:50:59{encoded}")
    assert response.status_code == 200, response.content
    assert any(row["id"] == str(job.pk) for row in response.json()["items"])
    early = engineer.get("training/jobs?created_before=0492-09-16T12:50:59%2B17:11")
    assert early.status_code == 200 and early.json()["items"] == []


def test_decimals_render_in_fixed_point_notation():
    """Django's encoder writes str(Decimal): a zero cost from an 8-decimal column read
    "0E-8" and a tiny one "5E-7"."""
    import json
    from decimal import Decimal

    from config.api import CrucibleRenderer

    body = CrucibleRenderer().render(
        None,
        {"zero": Decimal("0E-8"), "tiny": Decimal("5E-7"), "big": Decimal("1.5E+3")},
        response_status=200,
    )
    assert json.loads(body) == {"zero": "0.00000000", "tiny": "0.0000005", "big": "1500"}
