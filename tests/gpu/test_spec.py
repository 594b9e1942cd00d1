"""Job spec: sources, defaults, validation."""

import base64
import json

import pytest

from gpu.errors import SpecError
from gpu.spec import load_raw_spec, resolve_spec, webhook_from_raw

MINIMAL = {
    "job_id": "3f1c0a2e-1111-4c4c-9e9e-000000000001",
    "training_file": {"uri": "file:///data/train.jsonl"},
    "output": {"uri": "file:///tmp/out"},
}


def test_defaults_are_filled_from_the_protocol():
    spec = resolve_spec(MINIMAL)
    hp = spec.hyperparameters
    assert spec.spec_version == 1
    assert spec.base_model.name == "SmolLM2-135M-Instruct"
    assert spec.base_model.source == "offline"
    assert (hp.lora_r, hp.lora_alpha, hp.lora_dropout) == (16, 32, 0.05)
    assert hp.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (hp.learning_rate, hp.num_epochs, hp.max_steps) == (2e-4, 3, None)
    assert (hp.micro_batch_size, hp.gradient_accumulation_steps, hp.max_seq_length) == (2, 4, 1024)
    assert (hp.warmup_ratio, hp.lr_scheduler, hp.weight_decay, hp.max_grad_norm, hp.seed) == (
        0.03,
        "cosine",
        0.0,
        1.0,
        42,
    )
    assert spec.validation_split == 0.2
    assert spec.checkpoint_every_steps == 100
    assert spec.logging_steps == 1
    assert spec.heartbeat_seconds == 30
    assert spec.device == "auto"
    assert spec.resume is True
    assert spec.output.s3_region == "us-east-1"
    assert spec.webhook.url is None
    assert spec.warnings == []


def test_given_values_win_and_unknown_fields_warn():
    raw = {
        **MINIMAL,
        "hyperparameters": {"lora_r": 4, "max_steps": 7, "learning_rate": 1e-3, "bogus": 1},
        "device": "cpu",
        "resume": False,
        "extra": True,
        "webhook": {"url": "https://p.example/hook", "secret": "s3cret"},
    }
    spec = resolve_spec(raw)
    assert spec.hyperparameters.lora_r == 4
    assert spec.hyperparameters.max_steps == 7
    assert spec.hyperparameters.micro_batch_size == 2  # still the default
    assert spec.device == "cpu" and spec.resume is False
    assert sorted(spec.warnings) == [
        "Unknown field extra ignored",
        "Unknown field hyperparameters.bogus ignored",
    ]
    resolved = spec.to_dict()
    assert resolved["webhook"]["secret"] == "***"  # never written out
    assert spec.to_dict(redact=False)["webhook"]["secret"] == "s3cret"
    json.dumps(resolved)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"job_id": ""}, "job_id is required"),
        ({"training_file": None}, "training_file is required"),
        ({"training_file": {"uri": "ftp://x/y"}}, "training_file.uri must be"),
        ({"training_file": {"uri": "file:///x", "sha256": "abc"}}, "sha256 must be 64 hex"),
        ({"output": {"uri": "relative/path"}}, "output.uri must be"),
        ({"base_model": {"source": "ftp"}}, "base_model.source must be one of"),
        ({"base_model": {"source": "hub"}}, "base_model.path is required"),
        ({"hyperparameters": {"lora_r": 0}}, "lora_r must be >= 1"),
        ({"hyperparameters": {"lora_r": 2.5}}, "lora_r must be an integer"),
        ({"hyperparameters": {"learning_rate": 0}}, "learning_rate must be > 0"),
        ({"hyperparameters": {"lr_scheduler": "wavy"}}, "lr_scheduler must be one of"),
        ({"hyperparameters": {"target_modules": []}}, "target_modules must be"),
        ({"validation_split": 1.0}, "validation_split must be < 1"),
        ({"device": "tpu"}, "device must be one of"),
        ({"resume": "yes"}, "resume must be true or false"),
        ({"webhook": {"url": "http://x/hook"}}, "webhook.secret is required"),
        ({"spec_version": 2}, "Unsupported spec_version"),
    ],
)
def test_invalid_specs_are_rejected(patch, message):
    raw = {**MINIMAL, **patch}
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        resolve_spec(raw)


def test_spec_sources(tmp_path, monkeypatch):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(MINIMAL))
    assert load_raw_spec(spec_path=str(path)) == MINIMAL
    assert load_raw_spec(environ={"CRUCIBLE_JOB_SPEC": json.dumps(MINIMAL)}) == MINIMAL
    b64 = base64.b64encode(json.dumps(MINIMAL).encode()).decode()
    assert load_raw_spec(environ={"CRUCIBLE_JOB_SPEC_B64": b64}) == MINIMAL
    with pytest.raises(SpecError, match="No job spec"):
        load_raw_spec(environ={})
    with pytest.raises(SpecError, match="not valid JSON"):
        load_raw_spec(environ={"CRUCIBLE_JOB_SPEC": "{nope"})


def test_spec_url_is_fetched():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(MINIMAL).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/spec?sig=abc"
        assert load_raw_spec(spec_url=url) == MINIMAL
    finally:
        server.shutdown()
        server.server_close()


def test_webhook_from_an_invalid_spec():
    raw = {"job_id": "j1", "webhook": {"url": "http://h/x", "secret": "s"}, "output": 3}
    assert webhook_from_raw(raw) == ("j1", "http://h/x", "s")
    assert webhook_from_raw("nope") == (None, None, None)
