"""The offline model is converted once: a file lock serialises converters, and an atomic rename
means a half-written cache is never used."""

import threading
import time

import pytest

import gpu.model as model_mod
from gpu.model import CACHE_MARKER, ensure_offline_model


class FakeConverter:
    def __init__(self, fail=False):
        self.calls = 0
        self.active = 0
        self.max_active = 0
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, gguf, target):
        with self.lock:
            self.calls += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            target.mkdir(parents=True)
            (target / "model.safetensors").write_bytes(b"half")
            time.sleep(0.3)
            if self.fail:
                raise RuntimeError("disk full")
            (target / "config.json").write_text("{}")
        finally:
            with self.lock:
                self.active -= 1


def test_concurrent_loads_convert_once(tmp_path, monkeypatch):
    fake = FakeConverter()
    monkeypatch.setattr(model_mod, "_convert_gguf", fake)
    results, errors = [], []

    def load():
        try:
            results.append(ensure_offline_model("SmolLM2-135M-Instruct", tmp_path))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert fake.calls == 1 and fake.max_active == 1
    assert len(set(results)) == 1
    final = results[0]
    assert (final / CACHE_MARKER).is_file() and (final / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    # Later loads are served from the cache.
    assert ensure_offline_model("SmolLM2-135M-Instruct", tmp_path) == final and fake.calls == 1


def test_a_failed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(model_mod, "_convert_gguf", FakeConverter(fail=True))
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_offline_model("SmolLM2-135M-Instruct", tmp_path)
    assert not (tmp_path / "SmolLM2-135M-Instruct").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []

    # A stale temp folder (a killed converter) and a folder without the marker are not used.
    (tmp_path / ".SmolLM2-135M-Instruct.tmp-999-dead").mkdir()
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()
    (tmp_path / "SmolLM2-135M-Instruct" / "model.safetensors").write_bytes(b"half")
    good = FakeConverter()
    monkeypatch.setattr(model_mod, "_convert_gguf", good)
    final = ensure_offline_model("SmolLM2-135M-Instruct", tmp_path)
    assert good.calls == 1 and (final / CACHE_MARKER).is_file()
    assert not (tmp_path / ".SmolLM2-135M-Instruct.tmp-999-dead").exists()


def test_unknown_offline_model(tmp_path):
    from gpu.errors import WorkerError

    with pytest.raises(WorkerError, match="Unknown offline model"):
        ensure_offline_model("Llama-405B", tmp_path)


def test_the_real_cache_loads_fast(offline_model_dir):
    from transformers import AutoModelForCausalLM

    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(str(offline_model_dir))
    assert time.monotonic() - started < 20
    assert model.config.model_type == "llama"
    assert (offline_model_dir / "tokenizer.json").is_file()
    assert (offline_model_dir / "model.safetensors").is_file()
