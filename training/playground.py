"""Playground generation: one prompt answered by the base model and by a job's LoRA adapter.

The base model comes from ``gpu.model`` (the offline SmolLM2 is converted once and cached);
the adapter is copied out of storage (``config/storage.py``) into a temporary folder and put
on top with peft. One load serves both answers: the base answer is generated inside peft's
``disable_adapter()`` context. The loaded pair is kept for the next prompt on the same job
(one entry: a worker process holds at most one playground model).

Written self-contained on purpose (the evaluation app has its own generation code); torch,
transformers and peft are imported lazily so the web process never pays for them.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from config.storage import storage_listdir, storage_read

logger = logging.getLogger("crucible.training.playground")

DEFAULT_MAX_NEW_TOKENS = 96
MAX_NEW_TOKENS_LIMIT = 512
MAX_PROMPT_CHARS = 4000


@dataclass(frozen=True)
class Decoding:
    """Decoding settings, recorded with every run. ``temperature == 0`` means greedy."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.1
    seed: int = 42

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def generate_kwargs(self) -> dict:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "do_sample": self.do_sample,
        }
        if self.do_sample:
            kwargs |= {"temperature": self.temperature, "top_p": self.top_p}
        else:
            # Greedy: unset the sampling knobs a model's generation_config may carry.
            kwargs |= {"temperature": None, "top_p": None, "top_k": None}
        return kwargs

    def as_dict(self) -> dict:
        return {**asdict(self), "do_sample": self.do_sample}


@dataclass
class PairResult:
    base_output: str
    adapter_output: str
    device: str
    timings: dict = field(default_factory=dict)
    token_counts: dict = field(default_factory=dict)


# --- Adapter from storage ---------------------------------------------------------------------


def _walk(path: str) -> list[str]:
    folders, files = storage_listdir(path)
    found = [f"{path}/{name}" for name in files]
    for folder in folders:
        found += _walk(f"{path}/{folder}")
    return found


def copy_adapter(storage_path: str, target: Path) -> Path:
    """The adapter folder at ``storage_path`` (local or S3) copied into ``target``."""
    root = storage_path.rstrip("/")
    files = _walk(root)
    if not any(name.endswith("adapter_config.json") for name in files):
        raise FileNotFoundError(f"No adapter_config.json under {root}")
    for path in files:
        rel = path[len(root) + 1 :]
        if rel.startswith("checkpoint-"):
            continue  # training checkpoints are not part of the adapter
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(storage_read(path))
    return target


# --- The loaded pair (cached for the next prompt) -----------------------------------------------


@dataclass
class _Loaded:
    key: tuple
    model: Any  # a PeftModel
    tokenizer: Any
    device: str


_cache: _Loaded | None = None
_lock = threading.Lock()


def clear_cache() -> None:
    global _cache
    with _lock:
        _cache = None


def _load(base_model, adapter_storage_path: str, device: str, stage: Callable[[str], None]):
    global _cache
    from peft import PeftModel

    from gpu.model import load_base_model, resolve_device

    device = resolve_device(device)
    key = (base_model.name, base_model.source, base_model.path, adapter_storage_path, device)
    if _cache is not None and _cache.key == key:
        return _cache, {"load_base_s": 0.0, "load_adapter_s": 0.0, "cached": True}
    _cache = None  # free the previous pair before loading the next
    stage("Loading the base model")
    t0 = time.perf_counter()
    loaded = load_base_model(base_model, device)
    t1 = time.perf_counter()
    stage("Loading the adapter")
    tmp = Path(tempfile.mkdtemp(prefix="crucible-playground-"))
    try:
        adapter_dir = copy_adapter(adapter_storage_path, tmp / "adapter")
        model = PeftModel.from_pretrained(loaded.model, str(adapter_dir))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    model.config.use_cache = True
    t2 = time.perf_counter()
    _cache = _Loaded(key, model, loaded.tokenizer, device)
    return _cache, {"load_base_s": round(t1 - t0, 3), "load_adapter_s": round(t2 - t1, 3)}


def _generate(loaded: _Loaded, messages: list[dict], decoding: Decoding) -> tuple[str, int, float]:
    import torch

    tokenizer = loaded.tokenizer
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    inputs = {k: v.to(loaded.model.device) for k, v in inputs.items()}
    prompt_len = inputs["input_ids"].shape[1]
    torch.manual_seed(decoding.seed)
    started = time.perf_counter()
    with torch.inference_mode():
        output = loaded.model.generate(
            **inputs,
            **decoding.generate_kwargs(),
            use_cache=True,  # gpu.model turns the cache off for training
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    seconds = time.perf_counter() - started
    new_tokens = output[0, prompt_len:]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    return text, int(new_tokens.shape[0]), seconds


def generate_pair(
    *,
    base_model,
    adapter_storage_path: str,
    prompt: str,
    system_prompt: str = "",
    decoding: Decoding,
    device: str = "auto",
    stage: Callable[[str], None] = lambda s: None,
) -> PairResult:
    """The base model's and the adapter's answer to one prompt, with timings."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}
    ]
    with _lock:
        loaded, timings = _load(base_model, adapter_storage_path, device, stage)
        stage("Generating with the base model")
        with loaded.model.disable_adapter():
            base_text, base_tokens, base_s = _generate(loaded, messages, decoding)
        stage("Generating with the adapter")
        adapter_text, adapter_tokens, adapter_s = _generate(loaded, messages, decoding)
    timings |= {"base_generate_s": round(base_s, 3), "adapter_generate_s": round(adapter_s, 3)}
    return PairResult(
        base_output=base_text,
        adapter_output=adapter_text,
        device=loaded.device,
        timings=timings,
        token_counts={"base": base_tokens, "adapter": adapter_tokens},
    )
