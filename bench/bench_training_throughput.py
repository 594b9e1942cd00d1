"""Training throughput: the worker's packed, padding-free batches vs TRL's default padded batches.

Subject: the worker's setup (gpu.trainer): conversations packed best-fit-decreasing into rows
of max_seq_length tokens, position ids restarting per conversation, no pad tokens.
Baselines, what a user would pick instead: TRL SFTTrainer with its default data path (no
packing: each micro-batch padded to its longest conversation), and TRL's own ``packing=True``
(its best-fit-decreasing packing, padding-free), the best ordinary configuration.

Each configuration runs ROUNDS times (CRUCIBLE_BENCH_ROUNDS, default 3); the order of the three
rotates every round (bench/_alternate.py), so none always runs first on a warm or cold
machine; every figure is the median of the same number of runs, printed with its IQR and
min-max.

Same model (the offline SmolLM2-135M-Instruct, float32 LoRA on CPU), same tokenized data (the
same assistant-only labels), same optimizer settings and number of steps, same process. Only
real (non-pad) tokens count, for both. The first step of each is a warm-up and not timed.
Target: >= 1.5x.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._alternate import rotate, spread  # noqa: E402

STEPS = 4  # timed steps after one warm-up step
MAX_SEQ_LENGTH = 512
BASELINE_BATCH = 6  # conversations per micro-batch, padded to the longest
PACKED_BATCH = 2  # packed rows of MAX_SEQ_LENGTH tokens per micro-batch: about as many tokens
CONVERSATIONS = 96
SEED = 1234
ROUNDS = int(os.environ.get("CRUCIBLE_BENCH_ROUNDS", "3"))

TOPICS = [
    "a budget for a small bakery",
    "how to water tomato plants",
    "the difference between RAM and disk",
    "a polite reply to a late invoice",
    "training for a first 10k run",
    "how compound interest works",
    "choosing a laptop for school",
    "a weekend trip to the mountains",
]
WORDS = (  # noqa: SIM905 - a word list reads better as text
    "the a and to of in it is that for you with on as this be at by we can your will "
    "plan money time help start first next should could would because simple clear step "
    "cost price month week day save spend good better best keep check note list small "
    "large water sun soil plant grow run pace rest mile heart data memory fast slow store "
    "file program school battery screen weight trip road map pack coat boots snack friend"
).split()


def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def _text(rng: random.Random, n_words: int) -> str:
    out, left = [], n_words
    while left > 0:
        n = min(left, rng.randint(6, 16))
        out.append(_sentence(rng, n))
        left -= n
    return " ".join(out)


def make_conversations(n: int = CONVERSATIONS, seed: int = SEED):
    """Varied lengths like real chat data: short Q&A and a long tail of long replies."""
    from gpu.data import Conversation

    rng = random.Random(seed)
    conversations = []
    for i in range(n):
        messages = [{"role": "system", "content": "You are a helpful, concise assistant."}]
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
            messages.append(
                {
                    "role": "user",
                    "content": f"Tell me about {rng.choice(TOPICS)}. "
                    + _text(rng, rng.randint(5, 25)),
                }
            )
            reply_words = int(min(max(rng.lognormvariate(3.6, 0.8), 8), 300))
            messages.append({"role": "assistant", "content": _text(rng, reply_words)})
        conversations.append(Conversation(row=i + 1, id=f"bench-{i}", messages=messages))
    return conversations


class _Meter:
    """Real tokens per micro-batch, and (time, tokens) at the end of every optimizer step."""

    def __init__(self, trainer, count_tokens):
        from transformers import TrainerCallback

        self.tokens = 0
        self.slots = 0  # token positions computed, pads included
        self.marks: list[tuple[float, int]] = []
        meter = self
        original = trainer.training_step

        def training_step(model, inputs, *args, **kwargs):
            meter.tokens += count_tokens(inputs)
            meter.slots += int(inputs["input_ids"].numel())
            return original(model, inputs, *args, **kwargs)

        class Marks(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                meter.marks.append((time.perf_counter(), meter.tokens))

        trainer.training_step = training_step
        trainer.add_callback(Marks())

    def rate(self) -> tuple[float, int, float]:
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / (t1 - t0), n1 - n0, t1 - t0


def _run(label, trainer, count_tokens):
    meter = _Meter(trainer, count_tokens)
    trainer.train()
    rate, tokens, seconds = meter.rate()
    per_step = tokens / max(len(meter.marks) - 1, 1)
    padding = 1 - meter.tokens / meter.slots
    print(
        f"{label:<36} {rate:8.1f} tokens/s  ({tokens} real tokens in {seconds:.1f}s, "
        f"{per_step:.0f} a step, {padding:.0%} of positions are padding)"
    )
    return rate


def main() -> None:
    # Before torch is imported (see gpu/train.py): spinning OpenMP threads crawl on a shared CPU.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("CRUCIBLE_MODEL_CACHE", str(REPO / "var" / "models"))
    sys.path.insert(0, str(REPO))

    import datasets
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from gpu.data import REAL_TOKENS_KEY, ChatRenderer, build_examples, pack
    from gpu.model import ensure_offline_model, load_tokenizer, lora_config
    from gpu.spec import Hyperparameters
    from gpu.trainer import build_sft_config, build_trainer

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    model_dir = str(ensure_offline_model("SmolLM2-135M-Instruct"))
    tokenizer = load_tokenizer(model_dir)
    examples, stats = build_examples(make_conversations(), ChatRenderer(tokenizer), MAX_SEQ_LENGTH)
    lengths = sorted(len(e.input_ids) for e in examples)
    median = lengths[len(lengths) // 2]
    print(
        f"data: {len(examples)} conversations, {stats.train_tokens} tokens, length "
        f"min/median/max {lengths[0]}/{median}/{lengths[-1]}, max_seq_length {MAX_SEQ_LENGTH}; "
        f"torch threads {torch.get_num_threads()}; {STEPS} timed steps each after a warm-up"
    )
    hp = Hyperparameters(
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        learning_rate=2e-4,
        max_steps=STEPS + 1,
        micro_batch_size=PACKED_BATCH,
        gradient_accumulation_steps=1,
        max_seq_length=MAX_SEQ_LENGTH,
        warmup_ratio=0.0,
    )

    def fresh_model():
        torch.manual_seed(SEED)
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def trl_config(out: str, *, packing: bool, batch: int):
        return SFTConfig(
            output_dir=out,
            per_device_train_batch_size=batch,
            max_steps=STEPS + 1,
            learning_rate=hp.learning_rate,
            lr_scheduler_type=hp.lr_scheduler,
            max_length=MAX_SEQ_LENGTH,
            packing=packing,
            seed=SEED,
            # Same compute settings as the worker on CPU, so only the batching differs:
            use_cpu=True,
            bf16=False,
            activation_checkpointing=False,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
        )

    trl_data = Dataset.from_dict(
        {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
    )

    def real_tokens(inputs) -> int:
        # Padded batches carry an attention mask; padding-free packed rows have no pads.
        if "attention_mask" in inputs:
            return int(inputs["attention_mask"].sum())
        return int(inputs["input_ids"].numel())

    def trl_default(tmp: str):
        trainer = SFTTrainer(
            model=fresh_model(),
            args=trl_config(f"{tmp}/default", packing=False, batch=BASELINE_BATCH),
            train_dataset=trl_data,
            processing_class=tokenizer,
            peft_config=lora_config(hp),
        )
        assert not trainer.args.packing and not trainer.padding_free
        trainer.remove_callback(PrinterCallback)
        return trainer, real_tokens

    def trl_packing(tmp: str):
        trainer = SFTTrainer(
            model=fresh_model(),
            args=trl_config(f"{tmp}/packing", packing=True, batch=PACKED_BATCH),
            train_dataset=trl_data,
            processing_class=tokenizer,
            peft_config=lora_config(hp),
        )
        assert trainer.args.packing
        trainer.remove_callback(PrinterCallback)
        return trainer, real_tokens

    def worker(tmp: str):
        config = build_sft_config(
            output_dir=f"{tmp}/worker",
            hp=hp,
            total_steps=STEPS + 1,
            device="cpu",
            gradient_checkpointing=False,
        )
        trainer = build_trainer(
            model=fresh_model(),
            tokenizer=tokenizer,
            train_rows=pack(examples, MAX_SEQ_LENGTH),
            eval_rows=None,
            config=config,
            peft_config=lora_config(hp),
            simulate_error="",
        )
        return trainer, lambda inputs: int(inputs[REAL_TOKENS_KEY])

    subjects = [
        (f"TRL default, padded (batch {BASELINE_BATCH})", trl_default),
        (f"TRL packing=True (batch {PACKED_BATCH}x{MAX_SEQ_LENGTH})", trl_packing),
        (f"worker, packed rows (batch {PACKED_BATCH}x{MAX_SEQ_LENGTH})", worker),
    ]

    def measured(label, build):
        def run() -> float:  # real tokens/s
            with tempfile.TemporaryDirectory(prefix="crucible-bench-") as tmp:
                trainer, count = build(tmp)
                try:
                    return _run(label, trainer, count)
                finally:
                    del trainer

        return label, run

    rates = rotate(
        [measured(label, build) for label, build in subjects],
        ROUNDS,
        self_timed=True,
        on_round=lambda i, order: print(f"round {i + 1}/{ROUNDS}: " + " -> ".join(order)),
    )

    medians = {label: statistics.median(values) for label, values in rates.items()}
    (default_label, _), (packing_label, _), (worker_label, _) = subjects
    for label, value in medians.items():
        print(
            f"median of {ROUNDS}: {label:<36} {value:8.1f} tokens/s "
            f"({spread(rates[label], '.1f', median=False)})"
        )
    print(
        f"ratio worker/TRL default = {medians[worker_label] / medians[default_label]:.2f}x; "
        f"ratio worker/TRL packing=True = {medians[worker_label] / medians[packing_label]:.2f}x "
        f"(target >= 1.5x against the best baseline); "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
