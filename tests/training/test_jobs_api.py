"""Creating, starting, cancelling, deleting and listing training jobs through the API."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from config.roles import Role
from tests.conftest import assert_envelope
from training.models import JobStatus, TrainingJob


def create(client, training_file, **extra):
    payload = {
        "training_file_id": str(training_file.pk),
        "preset": "smoke",
        "name": "Smoke run",
        **extra,
    }
    return client.post("training/jobs", json=payload)


def test_catalogue_lists_the_seed_presets_and_base_models(api_as):
    viewer = api_as(Role.VIEWER)
    presets = {p["key"]: p for p in viewer.get("training/presets").json()}
    assert list(presets) == ["conservative", "balanced", "aggressive", "smoke"]
    assert presets["balanced"]["is_default"]
    assert presets["conservative"]["hyperparameters"]["lora_r"] == 8
    assert presets["balanced"]["hyperparameters"]["learning_rate"] == 2e-4
    assert presets["aggressive"]["hyperparameters"]["num_epochs"] == 4
    assert "Production models" in presets["balanced"]["best_for"]
    models = [m["name"] for m in viewer.get("training/base-models").json()]
    assert "SmolLM2-135M-Instruct" in models


def test_create_resolves_the_preset_with_overrides(engineer, training_file):
    response = create(
        engineer,
        training_file,
        overrides={"lora_r": 4, "validation_split": 0.25},
        tags=["Client-A", "smoke"],
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "pending"
    assert body["configuration"]["hyperparameters"]["lora_r"] == 4
    assert body["configuration"]["hyperparameters"]["max_steps"] == 12  # from the Smoke preset
    assert body["configuration"]["validation_split"] == 0.25
    assert body["configuration"]["checkpoint_every_steps"] == 6
    assert body["tags"] == ["client-a", "smoke"]
    assert body["created_by"] == engineer.user.username


def test_default_preset_is_balanced(engineer, training_file):
    body = engineer.post("training/jobs", json={"training_file_id": str(training_file.pk)}).json()
    assert body["preset"] == "balanced"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"lora_r": 0}, "lora_r"),
        ({"learning_rate": 5}, "learning_rate"),
        ({"warp_speed": 9}, "warp_speed"),
        ({"max_seq_length": 100000}, "max_seq_length"),
        ({"validation_split": 0.9}, "validation_split"),
    ],
)
def test_bad_overrides_are_refused_and_write_nothing(engineer, training_file, overrides, field):
    error = assert_envelope(
        create(engineer, training_file, overrides=overrides), 422, "validation_error"
    )
    assert any(f["field"] == field for f in error["details"]["fields"]), error
    assert TrainingJob.objects.count() == 0


def test_unknown_references_are_refused(engineer, training_file):
    assert_envelope(create(engineer, training_file, preset="turbo"), 422)
    assert_envelope(create(engineer, training_file, base_model="gpt-9"), 422)
    missing = engineer.post(
        "training/jobs", json={"training_file_id": "00000000-0000-0000-0000-000000000000"}
    )
    assert_envelope(missing, 422)
    assert TrainingJob.objects.count() == 0


def test_a_file_with_problems_cannot_be_trained(engineer, db):
    import io
    import json

    from corpora.services import training_file_create

    bad = training_file_create(
        name="bad",
        upload=io.BytesIO(
            json.dumps(
                {
                    "id": "x",
                    "messages": [
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "yo"},
                        {"role": "user", "content": "?"},
                    ],
                }
            ).encode()
        ),
        user=None,
    )
    error = assert_envelope(create(engineer, bad), 422)
    assert "line 1" in error["message"] and "assistant turn" in error["message"]


def test_start_queues_and_launches_once(engineer, training_file, fake_executor):
    job_id = create(engineer, training_file).json()["id"]
    response = engineer.post(f"training/jobs/{job_id}/start")
    assert response.status_code == 200
    job = TrainingJob.objects.get(pk=job_id)
    assert job.status == JobStatus.PROVISIONING and job.attempt == 1
    assert len(fake_executor.launched) == 1
    spec = fake_executor.launched[0]["spec"]
    assert spec["job_id"] == job_id and spec["resume"] is True
    assert spec["webhook"]["secret"] == job.webhook_secret
    assert spec["training_file"]["sha256"] == training_file.sha256
    assert spec["hyperparameters"]["max_steps"] == 12
    # Starting twice is a conflict; the launch task run twice does nothing more.
    assert_envelope(engineer.post(f"training/jobs/{job_id}/start"), 409, "conflict")
    from training.services import training_job_launch

    assert training_job_launch(job_id=job_id) is None
    assert len(fake_executor.launched) == 1


def test_delete_only_before_start(engineer, training_file, fake_executor):
    first = create(engineer, training_file).json()["id"]
    assert engineer.request("DELETE", f"training/jobs/{first}").status_code == 204
    assert not TrainingJob.objects.filter(pk=first).exists()
    second = create(engineer, training_file, start=True).json()["id"]
    assert_envelope(engineer.request("DELETE", f"training/jobs/{second}"), 409)


def test_cancel_stops_the_worker(engineer, training_file, fake_executor):
    job_id = create(engineer, training_file, start=True).json()["id"]
    body = engineer.post(f"training/jobs/{job_id}/cancel").json()
    assert body["status"] == "cancelled"
    assert fake_executor.cancelled == [("fake-1", False)]
    assert_envelope(engineer.post(f"training/jobs/{job_id}/cancel"), 409)


def test_notes_and_tags_are_editable(engineer, training_file):
    job_id = create(engineer, training_file).json()["id"]
    body = engineer.patch(
        f"training/jobs/{job_id}", json={"notes": "testing high LR", "tags": ["B", "a"]}
    ).json()
    assert body["notes"] == "testing high LR" and body["tags"] == ["a", "b"]


def test_viewers_read_but_cannot_act(api_as, engineer, training_file):
    job_id = create(engineer, training_file).json()["id"]
    viewer = api_as(Role.VIEWER)
    assert viewer.get(f"training/jobs/{job_id}").status_code == 200
    for action in ("start", "cancel", "retry"):
        assert_envelope(viewer.post(f"training/jobs/{job_id}/{action}"), 403)
    assert TrainingJob.objects.get(pk=job_id).status == JobStatus.PENDING


def test_list_filters_search_and_query_count(engineer, training_file, settings):
    settings.RATELIMIT_ENABLE = False
    for i in range(3):
        create(engineer, training_file, name=f"alpha {i}", tags=["client-a"])
    create(engineer, training_file, name="beta", notes="aggressive LR test", preset="aggressive")

    def count_queries(path):
        with CaptureQueriesContext(connection) as ctx:
            response = engineer.get(path)
        assert response.status_code == 200
        return len(ctx.captured_queries), response.json()

    few, body = count_queries("training/jobs")
    assert body["count"] == 4
    for i in range(10):
        create(engineer, training_file, name=f"gamma {i}")
    many, body = count_queries("training/jobs")
    assert many == few and body["count"] == 14
    assert engineer.get("training/jobs?tag=client-a").json()["count"] == 3
    assert engineer.get("training/jobs?q=aggressive").json()["count"] == 1
    assert engineer.get("training/jobs?preset=aggressive").json()["count"] == 1
    assert engineer.get(f"training/jobs?creator={engineer.user.username}").json()["count"] == 14
    assert engineer.get("training/jobs?status=completed").json()["count"] == 0
    names = [j["name"] for j in engineer.get("training/jobs?sort=name").json()["items"]][:2]
    assert names == ["alpha 0", "alpha 1"]
