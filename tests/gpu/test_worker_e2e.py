"""The worker as the platform runs it: ``python -m gpu.train --spec ...`` in a subprocess, real
training of the offline SmolLM2-135M on CPU, signed webhooks to a local stand-in platform."""

import csv
import json
import signal
import uuid

import pytest

from gpu.callbacks import METRIC_FIELDS
from gpu.checkpoints import verify_local
from gpu.storage import sha256_file
from tests.gpu.conftest import make_spec, start_worker, wait_for, worker_log

pytestmark = pytest.mark.slow

DATASET_FIELDS = {
    "conversations",
    "train_conversations",
    "val_conversations",
    "train_examples",
    "train_tokens",
    "val_tokens",
    "truncated_examples",
    "max_seq_length",
    "total_steps",
}


def _finish(proc, tmp_path, job_id, timeout=600):
    rc = proc.wait(timeout=timeout)
    return rc, worker_log(tmp_path, job_id)


def _job_id(name):
    return f"{name}-{uuid.uuid4().hex[:8]}"


def test_end_to_end_run_trains_and_reports(webhook_sink, tmp_path, offline_model_dir, persona_file):
    job = _job_id("e2e")
    out = tmp_path / "out"
    spec = make_spec(job, persona_file.as_uri(), out.as_uri(), webhook_sink.url)
    spec["training_file"]["sha256"] = sha256_file(persona_file)
    rc, log = _finish(start_worker(spec, tmp_path), tmp_path, job)
    assert rc == 0, log

    events = webhook_sink.events
    assert webhook_sink.bad_signatures == 0
    assert all(e["job_id"] == job for e in events)
    sequences = [e["sequence"] for e in events]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    types = [e["type"] for e in events if e["type"] != "heartbeat"]
    assert types[0] == "started" and types[-1] == "completed"
    stages = [e["data"]["stage"] for e in webhook_sink.of_type("stage")]
    assert stages == ["preprocessing", "model_loading", "training", "finalization"]
    assert webhook_sink.of_type("heartbeat"), "the heartbeat thread sends while working"

    started = webhook_sink.of_type("started")[0]["data"]
    assert started["device"] == "cpu" and started["resumed_from_step"] is None
    assert started["worker_version"] and started["torch_version"] and started["pid"]

    dataset = webhook_sink.of_type("dataset")[0]["data"]
    assert set(dataset) == DATASET_FIELDS
    assert dataset["conversations"] == 12
    assert (dataset["train_conversations"], dataset["val_conversations"]) == (10, 2)
    assert dataset["total_steps"] == 6 and dataset["truncated_examples"] == 0

    metrics = webhook_sink.of_type("metrics")
    train_metrics = [m["data"] for m in metrics if m["data"]["val_loss"] is None]
    steps = [m["step"] for m in train_metrics]
    # One record per logging step (plus, on a very slow machine, 60-second refreshes).
    assert steps == sorted(steps) and set(steps) == {1, 2, 3, 4, 5, 6}
    for m in train_metrics:
        assert set(m) == set(METRIC_FIELDS)
        assert m["total_steps"] == 6 and m["train_loss"] > 0 and m["learning_rate"] > 0
        assert m["tokens_per_second"] > 0 and m["grad_norm"] is not None
        assert m["gpu_memory_mb"] is None  # CPU
        assert m["elapsed_seconds"] > 0 and m["eta_seconds"] is not None
    assert any(m["data"]["val_loss"] is not None for m in metrics)  # evaluated at checkpoints

    checkpoints = webhook_sink.of_type("checkpoint")
    assert [c["data"]["step"] for c in checkpoints] == [3, 6]
    for c in checkpoints:
        folder = out / "checkpoints" / f"step-{c['data']['step']:06d}"
        assert c["data"]["uri"] == folder.as_uri()
        manifest = json.loads((folder / "manifest.json").read_text())
        assert verify_local(folder, manifest) is None
        assert c["data"]["size_bytes"] == sum(f["size"] for f in manifest["files"])
        names = {f["path"] for f in manifest["files"]}
        assert {
            "adapter_model.safetensors",
            "optimizer.pt",
            "scheduler.pt",
            "trainer_state.json",
        } <= names

    completed = webhook_sink.of_type("completed")[0]["data"]
    artifacts = completed["artifacts"]
    assert artifacts["adapter_uri"] == (out / "adapter").as_uri()
    final = completed["final_metrics"]
    assert final["global_step"] == 6 and final["train_tokens"] > 0
    assert final["val_loss"] is not None and final["train_runtime_seconds"] > 0
    ppl = completed["perplexity"]
    assert ppl["eval_tokens"] > 0 and ppl["method"]
    assert ppl["trained"] < ppl["baseline"], ppl
    assert ppl["improvement_pct"] > 0
    print(f"perplexity baseline {ppl['baseline']:.3f} -> trained {ppl['trained']:.3f}")

    # Artifacts
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        assert (out / "adapter" / name).is_file(), name
    history = json.loads((out / "metrics" / "history.json").read_text())
    assert {h["step"] for h in history if h["val_loss"] is None} == {1, 2, 3, 4, 5, 6}
    with open(out / "metrics" / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(METRIC_FIELDS) and len(rows) == len(history)
    resolved = json.loads((out / "config" / "resolved_config.json").read_text())
    assert resolved["webhook"]["secret"] == "***"
    assert resolved["hyperparameters"]["lora_r"] == 8 and resolved["hyperparameters"]["seed"] == 42
    assert resolved["versions"]["torch"] and resolved["versions"]["trl"]
    assert resolved["runtime"]["end_of_turn_token"] == "<|im_end|>"
    assert not (out / "events.spool.jsonl").exists()  # everything was delivered

    # The adapter loads on a fresh base model and generates.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(str(offline_model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    model.eval()
    messages = [
        {
            "role": "system",
            "content": "You are Captain Byte, a cheerful pirate who explains computers.",
        },
        {"role": "user", "content": "What is a mouse?"},
    ]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print("reply:", reply)
    assert reply.strip()


def test_resume_after_sigkill(webhook_sink, tmp_path, offline_model_dir, persona_file):
    job = _job_id("resume")
    out = tmp_path / "out"
    spec = make_spec(
        job, persona_file.as_uri(), out.as_uri(), webhook_sink.url, checkpoint_every_steps=2
    )
    proc = start_worker(spec, tmp_path)
    manifest = out / "checkpoints" / "step-000002" / "manifest.json"
    assert wait_for(manifest.exists, 400, proc=proc), worker_log(tmp_path, job)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not webhook_sink.of_type("completed")
    seen = len(webhook_sink.events)

    rc, log = _finish(start_worker(spec, tmp_path), tmp_path, job)
    assert rc == 0, log
    second = webhook_sink.events[seen:]
    started = [e for e in second if e["type"] == "started"][-1]["data"]
    resumed = started["resumed_from_step"]
    assert resumed in (2, 4)
    check = next(e for e in second if e["type"] == "resume_check")["data"]
    print("resume_check:", json.dumps(check))
    assert check["passed"], check
    assert check["resumed_from_step"] == resumed
    assert check["expected_step"] == check["actual_step"] == resumed
    assert check["expected_learning_rate"] == pytest.approx(check["actual_learning_rate"], rel=1e-5)
    assert check["first_loss_after_resume"] is not None and check["last_logged_loss"] is not None
    completed = next(e for e in second if e["type"] == "completed")["data"]
    assert completed["final_metrics"]["global_step"] == 6
    steps = [e["data"]["step"] for e in second if e["type"] == "metrics"]
    assert min(steps) >= resumed and resumed + 1 in steps and max(steps) == 6
    history = json.loads((out / "metrics" / "history.json").read_text())
    steps = [h["step"] for h in history if h["val_loss"] is None]
    assert steps == sorted(steps) and set(steps) == {1, 2, 3, 4, 5, 6}  # both runs


def test_sigterm_checkpoints_and_resumes_from_s3(
    webhook_sink, tmp_path, offline_model_dir, persona_file, s3_endpoint, aws_env
):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = f"gpu-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="uploads/persona.jsonl", Body=persona_file.read_bytes())
    job = _job_id("s3")
    prefix = f"training/jobs/{job}"
    spec = make_spec(
        job,
        f"s3://{bucket}/uploads/persona.jsonl",
        f"s3://{bucket}/{prefix}",
        webhook_sink.url,
        checkpoint_every_steps=2,
        training_file={"sha256": sha256_file(persona_file)},
        output={"s3_endpoint_url": s3_endpoint, "s3_region": "us-east-1"},
    )

    def has(key):
        return (
            client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{key}").get("KeyCount", 0) > 0
        )

    proc = start_worker(spec, tmp_path, aws_env)
    assert wait_for(lambda: has("checkpoints/step-000002/manifest.json"), 400, 0.2, proc), (
        worker_log(tmp_path, job)
    )
    proc.send_signal(signal.SIGTERM)
    rc, log = _finish(proc, tmp_path, job, timeout=300)
    assert rc == 143, log
    stopped = webhook_sink.of_type("stopped")[0]["data"]
    assert stopped["reason"] == "SIGTERM" and stopped["step"] >= 2
    step = stopped["step"]
    assert stopped["checkpoint_uri"] == f"s3://{bucket}/{prefix}/checkpoints/step-{step:06d}"
    assert has(f"checkpoints/step-{step:06d}/manifest.json")
    assert not webhook_sink.of_type("completed")
    seen = len(webhook_sink.events)

    rc, log = _finish(start_worker(spec, tmp_path, aws_env), tmp_path, job)
    assert rc == 0, log
    second = webhook_sink.events[seen:]
    assert next(e for e in second if e["type"] == "started")["data"]["resumed_from_step"] == step
    check = next(e for e in second if e["type"] == "resume_check")["data"]
    assert check["passed"], check
    completed = next(e for e in second if e["type"] == "completed")["data"]
    assert completed["final_metrics"]["global_step"] == 6
    assert completed["artifacts"]["adapter_uri"] == f"s3://{bucket}/{prefix}/adapter"
    for key in (
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "metrics/history.json",
        "metrics/history.csv",
        "config/resolved_config.json",
    ):
        assert has(key), key


@pytest.mark.parametrize(
    ("simulate", "exit_code", "error_type"),
    [("oom", 3, "OutOfMemoryError"), ("nan", 5, "NaNLossError")],
)
def test_simulated_failures_are_classified(
    webhook_sink, tmp_path, offline_model_dir, persona_file, simulate, exit_code, error_type
):
    job = _job_id(simulate)
    spec = make_spec(job, persona_file.as_uri(), (tmp_path / "out").as_uri(), webhook_sink.url)
    env = {"CRUCIBLE_SIMULATE_ERROR": simulate}
    rc, log = _finish(start_worker(spec, tmp_path, env), tmp_path, job)
    assert rc == exit_code, log
    error = webhook_sink.of_type("error")[0]["data"]
    assert error["error_type"] == error_type
    assert error_type in error["traceback"]
    assert not webhook_sink.of_type("completed") and not webhook_sink.of_type("metrics")
    if simulate == "oom":
        assert error["details"] == {
            "micro_batch_size": 1,
            "gradient_accumulation_steps": 1,
            "max_seq_length": 128,
        }
        assert "out of memory" in error["message"].lower()
    else:
        assert error["details"]["step"] == 1 and "nan" in error["message"].lower()


def test_dataset_error_exits_2_with_the_row(
    webhook_sink, tmp_path, offline_model_dir, persona_file
):
    lines = persona_file.read_text().splitlines()
    bad = json.loads(lines[4])
    bad["training_pairs"][0]["target_response"] = " "
    lines[4] = json.dumps(bad)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    job = _job_id("bad")
    spec = make_spec(job, path.as_uri(), (tmp_path / "out").as_uri(), webhook_sink.url)
    rc, log = _finish(start_worker(spec, tmp_path), tmp_path, job)
    assert rc == 2, log
    error = webhook_sink.of_type("error")[0]["data"]
    assert error["error_type"] == "DatasetFormatError"
    assert error["message"] == (
        "Row 5 (conversation conv-005): training_pairs[0].target_response is missing or empty"
    )
    assert error["details"] == {
        "row": 5,
        "conversation_id": "conv-005",
        "field": "training_pairs[0].target_response",
    }
