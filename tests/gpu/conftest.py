"""Fixtures for the training worker's tests (no database: the worker knows nothing of Django).

The offline base model is converted once into var/models (shared by every test and
every worker subprocess through CRUCIBLE_MODEL_CACHE) and reused by later test sessions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gpu.webhooks import verify

# Before torch is imported: spinning OpenMP threads crawl on a busy 2-core machine (see gpu/train.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
MODEL_CACHE = REPO / "var" / "models"  # the same cache the platform and the demo use
SECRET = "test-webhook-secret"


@pytest.fixture(scope="session")
def model_cache():
    os.environ["CRUCIBLE_MODEL_CACHE"] = str(MODEL_CACHE)
    return MODEL_CACHE


@pytest.fixture(scope="session")
def offline_model_dir(model_cache):
    from gpu.model import ensure_offline_model

    return ensure_offline_model("SmolLM2-135M-Instruct", model_cache)


@pytest.fixture(scope="session")
def tokenizer(offline_model_dir):
    from gpu.model import load_tokenizer

    return load_tokenizer(str(offline_model_dir))


@pytest.fixture(scope="session")
def base_model(offline_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(offline_model_dir), dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture
def persona_file():
    return DATA / "persona.jsonl"


@pytest.fixture
def aws_env(monkeypatch):
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return env


class WebhookSink:
    """A tiny platform: checks each request's HMAC and keeps the events in arrival order."""

    def __init__(self, secret: str = SECRET, port: int = 0):
        self.secret = secret
        self.events: list[dict] = []
        self.requests: list[dict] = []
        self.bad_signatures = 0
        self.fail_next: list[tuple[int, dict]] = []  # (status, headers) answers to give first
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k: v for k, v in self.headers.items()}
                with sink.lock:
                    sink.requests.append({"headers": headers, "body": body, "at": time.monotonic()})
                    if sink.fail_next:
                        status, extra = sink.fail_next.pop(0)
                        self.send_response(status)
                        for key, value in extra.items():
                            self.send_header(key, value)
                        self.end_headers()
                        return
                ok = verify(
                    sink.secret,
                    self.headers.get("X-Crucible-Timestamp", ""),
                    body,
                    self.headers.get("X-Crucible-Signature", ""),
                )
                event = json.loads(body) if ok else None
                if ok and event.get("event_id") != self.headers.get("X-Crucible-Event-Id"):
                    ok = False
                with sink.lock:
                    if not ok:
                        sink.bad_signatures += 1
                    elif all(e["event_id"] != event["event_id"] for e in sink.events):
                        sink.events.append(event)
                self.send_response(200 if ok else 401)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/api/v1/training/webhook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def of_type(self, type_: str) -> list[dict]:
        with self.lock:
            return [e for e in self.events if e["type"] == type_]

    def types(self) -> list[str]:
        with self.lock:
            return [e["type"] for e in self.events]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook_sink():
    sink = WebhookSink()
    yield sink
    sink.close()


def make_spec(
    job_id: str, training_uri: str, output_uri: str, webhook_url=None, **overrides
) -> dict:
    """A small, fast job: rows of 128 tokens, a high learning rate, a few steps."""
    spec = {
        "spec_version": 1,
        "job_id": job_id,
        "base_model": {"name": "SmolLM2-135M-Instruct", "source": "offline"},
        "training_file": {"uri": training_uri, "sha256": None},
        "hyperparameters": {
            "lora_r": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "learning_rate": 0.003,
            "max_steps": 6,
            "micro_batch_size": 1,
            "gradient_accumulation_steps": 1,
            "max_seq_length": 128,
            "warmup_ratio": 0.0,
            "lr_scheduler": "cosine",
        },
        "validation_split": 0.2,
        "checkpoint_every_steps": 3,
        "logging_steps": 1,
        "heartbeat_seconds": 2,
        "device": "cpu",
        "output": {"uri": output_uri},
        "webhook": {"url": webhook_url, "secret": SECRET if webhook_url else None},
        "resume": True,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def worker_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRUCIBLE_")}
    env.update(
        {
            "CRUCIBLE_MODEL_CACHE": str(MODEL_CACHE),
            "CRUCIBLE_WEBHOOK_FLUSH_TIMEOUT": "20",
            "CRUCIBLE_WEBHOOK_BACKOFF_BASE": "0.2",
            "CRUCIBLE_WEBHOOK_IDLE_RETRY": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


def start_worker(spec: dict, tmp_path: Path, env: dict | None = None) -> subprocess.Popen:
    spec_path = tmp_path / f"spec-{spec['job_id']}-{time.monotonic_ns()}.json"
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "gpu.train", "--spec", str(spec_path)]
    command += ["--workdir", str(tmp_path / "work")]
    with open(tmp_path / f"worker-{spec['job_id']}.log", "ab") as log:
        return subprocess.Popen(
            command, cwd=REPO, env=worker_env(env), stdout=log, stderr=subprocess.STDOUT
        )


def worker_log(tmp_path: Path, job_id: str) -> str:
    path = tmp_path / f"worker-{job_id}.log"
    return path.read_text(errors="replace")[-6000:] if path.exists() else ""


def wait_for(
    predicate, timeout: float, interval: float = 0.1, proc: subprocess.Popen | None = None
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(interval)
    return predicate()
