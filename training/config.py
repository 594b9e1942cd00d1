"""Training configuration: presets' hyperparameters, validated overrides, the job spec."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field, ValidationError

from config.errors import InvalidInput


class Hyperparameters(Schema):
    """Every knob a job may set, with its bounds. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    lora_r: int = Field(16, ge=1, le=256, description="LoRA rank: capacity of the adapter.")
    lora_alpha: int = Field(32, ge=1, le=1024, description="LoRA scaling; usually 2 x rank.")
    lora_dropout: float = Field(0.05, ge=0, le=0.5, description="Dropout on the adapter.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Layers that get an adapter.",
    )
    learning_rate: float = Field(2e-4, gt=0, le=1e-2, description="Peak learning rate.")
    num_epochs: int = Field(3, ge=1, le=50, description="Passes over the training split.")
    max_steps: int | None = Field(
        None, ge=1, le=1_000_000, description="Stop after this many optimizer steps."
    )
    micro_batch_size: int = Field(2, ge=1, le=128, description="Sequences per forward pass.")
    gradient_accumulation_steps: int = Field(
        4, ge=1, le=512, description="Micro-batches per optimizer step."
    )
    max_seq_length: int = Field(2048, ge=64, le=131072, description="Tokens per sequence.")
    warmup_ratio: float = Field(0.03, ge=0, le=0.5, description="Share of steps warming up.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0, le=0.5)
    max_grad_norm: float = Field(1.0, gt=0, le=100)
    seed: int = Field(42, ge=0, le=2**31 - 1)


class RunSettings(Schema):
    model_config = ConfigDict(extra="forbid")

    validation_split: float = Field(0.2, ge=0.05, le=0.5)
    checkpoint_every_steps: int = Field(100, ge=1, le=100_000)
    logging_steps: int = Field(1, ge=1, le=1000)
    heartbeat_seconds: int = Field(30, ge=5, le=600)


RUN_SETTING_KEYS = set(RunSettings.model_fields)


def _field_errors(exc: ValidationError) -> list[dict]:
    return [
        {"field": ".".join(str(p) for p in err["loc"]), "message": err["msg"]}
        for err in exc.errors()
    ]


def resolve_configuration(
    *, preset_hyperparameters: dict, overrides: dict | None, context_length: int
) -> dict:
    """Preset values, then the user's overrides, validated; returns the job configuration.

    Overrides may hold hyperparameters and run settings (validation_split,
    checkpoint_every_steps, logging_steps, heartbeat_seconds) side by side.
    """
    overrides = dict(overrides or {})
    run_overrides = {k: overrides.pop(k) for k in list(overrides) if k in RUN_SETTING_KEYS}
    preset_run = {k: v for k, v in preset_hyperparameters.items() if k in RUN_SETTING_KEYS}
    preset_hp = {k: v for k, v in preset_hyperparameters.items() if k not in RUN_SETTING_KEYS}
    try:
        hyperparameters = Hyperparameters(**{**preset_hp, **overrides})
        run = RunSettings(**{**preset_run, **run_overrides})
    except ValidationError as exc:
        errors = _field_errors(exc)
        raise InvalidInput(
            "The training configuration is not valid: "
            + "; ".join(f"{e['field']}: {e['message']}" for e in errors[:3]),
            details={"fields": errors},
        ) from exc
    if hyperparameters.max_seq_length > context_length:
        raise InvalidInput(
            f"max_seq_length {hyperparameters.max_seq_length} is over the base model's context "
            f"length ({context_length}).",
            details={"fields": [{"field": "max_seq_length", "message": "over context length"}]},
        )
    return {"hyperparameters": hyperparameters.model_dump(), **run.model_dump()}


def configuration_diff(old: dict, new: dict) -> list[dict]:
    """Field-by-field differences between two configurations (for retries and compare)."""
    changes = []
    flat_old = {
        **old.get("hyperparameters", {}),
        **{k: v for k, v in old.items() if k != "hyperparameters"},
    }
    flat_new = {
        **new.get("hyperparameters", {}),
        **{k: v for k, v in new.items() if k != "hyperparameters"},
    }
    for key in sorted(set(flat_old) | set(flat_new)):
        if flat_old.get(key) != flat_new.get(key):
            changes.append({"field": key, "old": flat_old.get(key), "new": flat_new.get(key)})
    return changes
