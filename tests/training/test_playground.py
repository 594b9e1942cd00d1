"""The playground: a prompt answered by the base model and a job's adapter, side by side.

Most tests stand in for the generation (``training.playground.generate_pair``); one goes
through the model gateway with the offline provider's generation stood in for, and the slow one
really generates (through the gateway) with the offline SmolLM2 and a small LoRA adapter made
here with peft.
"""

from __future__ import annotations

import tempfile
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from config.errors import Conflict, InvalidInput
from config.roles import Role
from config.storage import storage_save
from tests.conftest import assert_envelope
from tests.training.test_pages import completed_job, make_job, signed_in
from training import playground, services, tasks
from training.models import Artifact, JobStatus, PlaygroundRun

HTMX = {"HX-Request": "true"}


@pytest.fixture
def job(training_file, smollm, smoke):
    # completed_job gives it an adapter artifact (at a fake path unless a test stores one).
    return completed_job(training_file, smollm, smoke, name="Advisor v3")


@pytest.fixture
def queued(monkeypatch):
    """Runs enqueued by the service (on commit), instead of a broker."""
    sent: list[str] = []
    monkeypatch.setattr(tasks.run_playground, "delay", lambda run_id: sent.append(run_id))
    monkeypatch.setattr("django.db.transaction.on_commit", lambda fn, *a, **k: fn())
    return sent


@pytest.fixture
def fake_generate(monkeypatch):
    calls: list[dict] = []

    def generate_pair(**kwargs):
        calls.append(kwargs)
        kwargs["stage"]("Generating with the base model")
        return playground.PairResult(
            base_output="Save a little every month.",
            adapter_output="Start small and automate it: a standing order on payday.",
            device="cpu",
            timings={
                "load_base_s": 0.5,
                "load_adapter_s": 0.1,
                "base_generate_s": 1.2,
                "adapter_generate_s": 1.1,
            },
            token_counts={"base": 7, "adapter": 14},
        )

    monkeypatch.setattr(playground, "generate_pair", generate_pair)
    return calls


# --- Service ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_run_is_queued_then_generated_once(job, queued, fake_generate):
    run = services.playground_run_create(
        job=job, user=None, prompt="  How do I save?  ", system_prompt="Be kind.", max_new_tokens=32
    )
    assert queued == [str(run.pk)]
    assert run.status == PlaygroundRun.Status.QUEUED and run.prompt == "How do I save?"
    assert run.decoding == {
        "max_new_tokens": 32,
        "temperature": 0.0,
        "top_p": 1.0,
        "repetition_penalty": 1.1,
        "seed": 42,
        "do_sample": False,
    }

    done = services.playground_run_execute(run_id=str(run.pk))
    assert done.status == PlaygroundRun.Status.COMPLETED
    assert done.adapter_output.startswith("Start small") and done.base_output
    assert done.token_counts == {"base": 7, "adapter": 14} and done.device == "cpu"
    assert done.timings["adapter_generate_s"] == 1.1 and done.completed_at and done.started_at
    assert fake_generate[0]["prompt"] == "How do I save?"
    assert fake_generate[0]["system_prompt"] == "Be kind."
    assert fake_generate[0]["decoding"].max_new_tokens == 32
    assert fake_generate[0]["job"] == job and fake_generate[0]["subject"] == done
    # A second delivery of the task finds nothing to claim.
    assert services.playground_run_execute(run_id=str(run.pk)) is None
    assert len(fake_generate) == 1


@pytest.mark.django_db
def test_a_run_whose_worker_died_is_claimed_again(job, queued, fake_generate):
    run = services.playground_run_create(job=job, user=None, prompt="hi")
    PlaygroundRun.objects.filter(pk=run.pk).update(
        status=PlaygroundRun.Status.RUNNING, started_at=timezone.now() - timedelta(minutes=1)
    )
    assert services.playground_run_execute(run_id=str(run.pk)) is None  # still fresh
    PlaygroundRun.objects.filter(pk=run.pk).update(started_at=timezone.now() - timedelta(hours=1))
    assert services.playground_run_execute(run_id=str(run.pk)).status == "completed"


@pytest.mark.django_db
def test_a_generation_error_fails_the_run_with_its_message(job, queued, monkeypatch):
    def broken(**kwargs):
        raise FileNotFoundError("No adapter_config.json under training/jobs/x/adapter")

    monkeypatch.setattr(playground, "generate_pair", broken)
    run = services.playground_run_create(job=job, user=None, prompt="hi")
    failed = services.playground_run_execute(run_id=str(run.pk))
    assert failed.status == PlaygroundRun.Status.FAILED
    assert failed.error_message == (
        "FileNotFoundError: No adapter_config.json under training/jobs/x/adapter"
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 4001}, "prompt"),
        ({"system_prompt": "x" * 4001}, "system_prompt"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 100_000}, "max_new_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"repetition_penalty": 5}, "repetition_penalty"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_settings_are_named_and_nothing_is_written(job, queued, kwargs, field):
    with pytest.raises(InvalidInput) as info:
        services.playground_run_create(job=job, user=None, **{"prompt": "hi", **kwargs})
    assert [f["field"] for f in info.value.details["fields"]] == [field]
    assert not PlaygroundRun.objects.exists() and queued == []


@pytest.mark.django_db
def test_only_completed_jobs_with_an_adapter(job, training_file, smollm, smoke, queued):
    running = make_job(training_file, smollm, smoke, name="running", status=JobStatus.TRAINING)
    with pytest.raises(Conflict, match="completed job with an adapter"):
        services.playground_run_create(job=running, user=None, prompt="hi")
    Artifact.objects.filter(job=job).delete()
    with pytest.raises(Conflict):
        services.playground_run_create(job=job, user=None, prompt="hi")
    assert not PlaygroundRun.objects.exists()


# --- API -------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_playground_api(job, api_as, anon_api, queued, fake_generate):
    engineer = api_as(Role.ENGINEER)
    response = engineer.post(
        "training/playground", json={"job_id": str(job.pk), "prompt": "hi", "max_new_tokens": 16}
    )
    assert response.status_code == 202, response.content
    run = response.json()
    assert run["status"] == "queued" and run["decoding"]["max_new_tokens"] == 16
    services.playground_run_execute(run_id=run["id"])
    got = api_as(Role.VIEWER).get(f"training/playground/{run['id']}")
    assert got.status_code == 200 and got.json()["status"] == "completed"
    assert got.json()["adapter_output"].startswith("Start small")

    assert_envelope(api_as(Role.VIEWER).get(f"training/playground/{uuid.uuid4()}"), 404)
    payload = {"job_id": str(job.pk), "prompt": "hi"}
    assert_envelope(api_as(Role.VIEWER).post("training/playground", json=payload), 403)
    assert_envelope(api_as(Role.ANALYST).post("training/playground", json=payload), 403)
    assert_envelope(anon_api.post("training/playground", json=payload), 401)
    assert_envelope(anon_api.get(f"training/playground/{run['id']}"), 401)

    bad = engineer.post("training/playground", json={"job_id": str(job.pk), "prompt": ""})
    assert "prompt" in assert_envelope(bad, 422, "validation_error")["message"]
    unknown = engineer.post(
        "training/playground", json={"job_id": str(uuid.uuid4()), "prompt": "x"}
    )
    assert_envelope(unknown, 404, "not_found")
    assert PlaygroundRun.objects.count() == 1 and len(queued) == 1


# --- Page ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_playground_page_empty_state(training_file, smollm, smoke):
    make_job(training_file, smollm, smoke, name="not done")
    client, _ = signed_in(Role.ENGINEER)
    html = client.get("/training/playground/").content.decode()
    assert "No adapter to try yet" in html and 'id="playground-form"' not in html


@pytest.mark.django_db
def test_playground_page_run_and_poll(job, queued, fake_generate):
    client, user = signed_in(Role.ENGINEER)
    html = client.get("/training/playground/").content.decode()
    assert f'<option value="{job.pk}" selected>' in html
    # The system prompt the adapter trained with is prefilled; training prompts are one click.
    assert "You are Elena Morales" in html
    assert 'data-example="How do I save for goal 0?"' in html
    assert "Answers appear here" in html

    response = client.post(
        "/training/playground/",
        {
            "job": str(job.pk),
            "prompt": "How do I save?",
            "max_new_tokens": "24",
            "temperature": "0",
        },
        headers=HTMX,
    )
    assert response.status_code == 200
    run = PlaygroundRun.objects.get()
    assert run.created_by == user and run.decoding["max_new_tokens"] == 24
    assert response["HX-Push-Url"] == f"/training/playground/?job={job.pk}&run={run.pk}"
    html = response.content.decode()
    # Queued: the answer card polls until the run is finished.
    assert 'aria-busy="true"' in html
    assert f'hx-get="/training/playground/?part=run&amp;run={run.pk}"' in html
    assert "Waiting for a worker" in html

    services.playground_run_execute(run_id=str(run.pk))
    html = client.get(f"/training/playground/?part=run&run={run.pk}", headers=HTMX).content.decode()
    assert "hx-get" not in html and 'aria-busy="false"' in html
    assert "Start small and automate it" in html and "Save a little every month." in html
    assert "greedy · max 24 new tokens" in html and "14 tokens · 12.7 tok/s" in html

    # Opening the run's URL shows the same answers, the prompt and the history.
    html = client.get(f"/training/playground/?job={job.pk}&run={run.pk}").content.decode()
    assert "Start small and automate it" in html and "Recent prompts for this adapter" in html


@pytest.mark.django_db
def test_playground_page_validation_and_roles(job, training_file, smollm, smoke, queued):
    client, _ = signed_in(Role.ENGINEER)
    response = client.post(
        "/training/playground/", {"job": str(job.pk), "prompt": ""}, headers=HTMX
    )
    assert response.status_code == 400
    html = response.content.decode()
    assert "Check the highlighted field." in html and "Type a prompt." in html
    assert 'aria-invalid="true"' in html
    response = client.post(
        "/training/playground/", {"job": str(job.pk), "prompt": "x", "temperature": "hot"}
    )
    assert response.status_code == 400 and "Enter a number." in response.content.decode()
    running = make_job(training_file, smollm, smoke, name="running", status=JobStatus.TRAINING)
    response = client.get(f"/training/playground/?job={running.pk}")
    assert response.status_code == 404 and "has no adapter to try" in response.content.decode()

    viewer, _ = signed_in(Role.VIEWER)
    html = viewer.get("/training/playground/").content.decode()
    assert "Engineers and admins run new prompts." in html and 'id="playground-form"' not in html
    assert (
        viewer.post("/training/playground/", {"job": str(job.pk), "prompt": "x"}).status_code == 403
    )
    assert not PlaygroundRun.objects.exists() and queued == []


# --- Real generation -------------------------------------------------------------------------


def _store_tiny_adapter(job) -> None:
    """A LoRA adapter on the offline base (random, untrained weights), saved to storage."""
    import torch
    from peft import LoraConfig, get_peft_model

    from gpu.model import load_base_model

    loaded = load_base_model(job.base_model, "cpu")
    torch.manual_seed(1234)  # the same random adapter every run (deterministic answers)
    config = LoraConfig(
        r=4,
        lora_alpha=64,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
        init_lora_weights=False,  # random B: the adapter really changes the answers
    )
    model = get_peft_model(loaded.model, config)
    prefix = f"training/jobs/{job.pk}/adapter"
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        for path in Path(tmp).iterdir():
            with path.open("rb") as handle:
                storage_save(f"{prefix}/{path.name}", handle)
    Artifact.objects.filter(job=job, kind=Artifact.Kind.ADAPTER).update(storage_path=prefix)


@pytest.mark.django_db
def test_generation_goes_through_the_gateway(job, queued, monkeypatch):
    """Both answers are gateway calls: the base model's registry key and the job's adapter,
    registered as an offline model on it (revision = the adapter's checksum); each call is a
    ledger row with feature "playground" and the run as subject; the same prompt again is
    answered from the gateway's exact cache. The offline provider's generation is stood in for
    here (the slow test below really generates)."""
    from billing.models import LlmCall
    from jobs.gateway.providers import OfflineProvider, ProviderResponse
    from jobs.models import RegisteredModel

    seen: list[tuple[str, dict]] = []

    def chat(self, model, request, *, timeout, request_id):
        seen.append((model.key, request))
        text = f"{'tuned' if model.adapter_uri else 'base'} answer"
        body = {
            "id": "chatcmpl-x",
            "object": "chat.completion",
            "created": 1,
            "model": model.remote_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14},
        }
        return ProviderResponse(body, 12, 2)

    prefix = f"training/jobs/{job.pk}/adapter"
    storage_save(f"{prefix}/adapter_config.json", b'{"peft_type": "LORA", "r": 4}')
    storage_save(f"{prefix}/adapter_model.safetensors", b"weights")
    Artifact.objects.filter(job=job, kind=Artifact.Kind.ADAPTER).update(storage_path=prefix)
    monkeypatch.setattr(OfflineProvider, "chat", chat)
    monkeypatch.setattr(OfflineProvider, "prompt_tokens", lambda self, model, request: 12)
    user = signed_in(Role.ENGINEER)[1]
    run = services.playground_run_create(
        job=job, user=user, prompt="How do I save?", system_prompt="Be kind.", max_new_tokens=24
    )
    done = services.playground_run_execute(run_id=str(run.pk))
    assert done.status == PlaygroundRun.Status.COMPLETED, done.error_message
    assert (done.base_output, done.adapter_output) == ("base answer", "tuned answer")
    assert done.token_counts == {"base": 2, "adapter": 2}
    assert done.timings["cached"] is False

    adapter = RegisteredModel.objects.get(key=f"offline/crucible-{job.pk}")
    assert adapter.parent == "offline/smollm2-135m-instruct" and adapter.adapter_uri
    assert adapter.revision.startswith("sha256:") and adapter.price_source == "local"
    assert [key for key, _ in seen] == [adapter.parent, adapter.key]
    request = seen[0][1]
    assert request["messages"][0] == {"role": "system", "content": "Be kind."}
    assert request["max_tokens"] == 24 and request["seed"] == 42
    assert request["repetition_penalty"] == 1.1

    rows = LlmCall.objects.filter(feature="playground").order_by("id")
    assert [r.model for r in rows] == [adapter.parent, adapter.key]
    assert {r.object_id for r in rows} == {str(run.pk)} and {r.user_id for r in rows} == {user.pk}

    again = services.playground_run_create(
        job=job, user=user, prompt="How do I save?", system_prompt="Be kind.", max_new_tokens=24
    )
    again = services.playground_run_execute(run_id=str(again.pk))
    assert again.timings["cached"] is True and len(seen) == 2  # the cache answered both
    assert again.adapter_output == "tuned answer"
    assert RegisteredModel.objects.filter(key=adapter.key).count() == 1  # registered once


@pytest.mark.slow
@pytest.mark.django_db
def test_real_generation_with_the_offline_model_and_an_adapter(job, queued):
    from gpu import generate

    _store_tiny_adapter(job)
    generate.clear_cache()
    run = services.playground_run_create(
        job=job,
        user=None,
        prompt="How do I start saving money?",
        system_prompt="You are a helpful financial advisor.",
        max_new_tokens=8,
    )
    done = services.playground_run_execute(run_id=str(run.pk))
    assert done.status == PlaygroundRun.Status.COMPLETED, done.error_message
    assert done.base_output.strip() and done.adapter_output.strip()
    assert done.base_output != done.adapter_output  # the adapter changes the answer
    assert 0 < done.token_counts["base"] <= 8 and 0 < done.token_counts["adapter"] <= 8
    assert done.device == "cpu"
    assert set(done.timings) >= {"base_generate_s", "adapter_generate_s", "cached"}
    assert done.timings["cached"] is False
    assert done.decoding["do_sample"] is False

    # The same prompt and decoding again: the gateway's exact cache answers, identically.
    again = services.playground_run_create(
        job=job,
        user=None,
        prompt="How do I start saving money?",
        system_prompt="You are a helpful financial advisor.",
        max_new_tokens=8,
    )
    again = services.playground_run_execute(run_id=str(again.pk))
    assert again.status == "completed" and again.timings["cached"] is True
    assert (again.base_output, again.adapter_output) == (done.base_output, done.adapter_output)
    generate.clear_cache()
