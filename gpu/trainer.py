"""TRL SFTTrainer set up for packed, assistant-only-labelled rows.

The datasets handed to the trainer are already tokenized (``input_ids``, ``labels`` with -100
outside assistant turns, ``seq_lengths`` of the packed conversations), so TRL keeps the labels
as they are; ``PackedCollator`` builds position ids per conversation and no padding. TRL's own
packing/padding-free options are left off on purpose: its padding-free mode flattens a whole
micro-batch into one row (quadratic attention over the row with SDPA), while one packed row
per example keeps attention per row.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from trl import SFTConfig, SFTTrainer

from gpu.data import REAL_TOKENS_KEY, PackedCollator
from gpu.errors import NaNLossError


def warmup_steps(hp, total_steps: int) -> int:
    return math.ceil(total_steps * hp.warmup_ratio)


def build_sft_config(
    *,
    output_dir: str,
    hp,
    total_steps: int,
    device: str,
    gradient_checkpointing: bool,
    precision: str | None = None,
    logging_steps: int = 1,
    save_steps: int | None = None,
    eval_steps: int | None = None,
) -> SFTConfig:
    cuda = device == "cuda"
    precision = precision or ("bfloat16" if cuda else "float32")
    return SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=hp.micro_batch_size,
        per_device_eval_batch_size=hp.micro_batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        learning_rate=hp.learning_rate,
        lr_scheduler_type=hp.lr_scheduler,
        warmup_steps=warmup_steps(hp, total_steps),
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        num_train_epochs=hp.num_epochs,
        max_steps=total_steps,
        seed=hp.seed,
        data_seed=hp.seed,
        optim="adamw_torch",
        bf16=cuda and precision == "bfloat16",
        fp16=cuda and precision == "float16",
        use_cpu=not cuda,
        activation_checkpointing=gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False}
        if gradient_checkpointing
        else None,
        logging_steps=logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must surface, not be averaged away
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=2,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        report_to=[],
        disable_tqdm=True,
        log_level="warning",
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        # Data arrives tokenized and packed: no TRL truncation, packing or padding-free.
        max_length=None,
        packing=False,
        padding_free=False,
        assistant_only_loss=False,
        completion_only_loss=False,
    )


class CrucibleTrainer(SFTTrainer):
    """Counts real tokens, fails fast on a non-finite loss, and can simulate an OOM for tests."""

    def __init__(self, *args, simulate_error: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.real_tokens_seen = 0
        self.simulate_error = (simulate_error or "").strip().lower() or None

    def _prepare_inputs(self, inputs):
        real = inputs.pop(REAL_TOKENS_KEY, None)
        if real is not None and self.model.training:
            self.real_tokens_seen += int(real)
        return super()._prepare_inputs(inputs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.simulate_error == "oom":
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB "
                "(simulated by CRUCIBLE_SIMULATE_ERROR=oom)"
            )
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.simulate_error == "nan":
            loss = loss * float("nan")
        if not torch.isfinite(loss.detach()).all():
            step = self.state.global_step + 1
            raise NaNLossError(
                f"The training loss became {loss.item()} at step {step}; lower the learning rate "
                "or check the data",
                {"step": step, "learning_rate": self._get_learning_rate()},
            )
        return loss


def build_trainer(
    *,
    model,
    tokenizer,
    train_rows,
    eval_rows,
    config: SFTConfig,
    peft_config,
    callbacks=None,
    simulate_error: str | None = None,
) -> CrucibleTrainer:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if simulate_error is None:
        simulate_error = os.environ.get("CRUCIBLE_SIMULATE_ERROR")
    trainer = CrucibleTrainer(
        model=model,
        args=config,
        data_collator=PackedCollator(tokenizer.pad_token_id),
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
        simulate_error=simulate_error,
    )
    # Logs become metrics events; Trainer's own printing would mix dicts into stdout.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def scheduled_learning_rate(hp, total_steps: int, step: int) -> float:
    """The LR the schedule gives optimizer step ``step`` (1-based), recomputed from the
    hyperparameters exactly as Trainer builds its scheduler."""
    from transformers import get_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=hp.learning_rate)
    scheduler = get_scheduler(
        hp.lr_scheduler,
        optimizer,
        num_warmup_steps=warmup_steps(hp, total_steps),
        num_training_steps=total_steps,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(step - 1):
            optimizer.step()
            scheduler.step()
    return float(scheduler.get_last_lr()[0])
