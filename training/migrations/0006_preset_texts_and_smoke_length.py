"""Presets: no dataset-specific figures in the texts, and Smoke sequences long enough for the
sample file.

- The Conservative, Balanced and Aggressive explanations quoted hours and dollars for the
  seed's 242-conversation dataset, whatever file was chosen; the new-job page now shows the
  steps, epochs, time and cost estimated for the file actually chosen, so the texts describe
  the trade-off only.
- Smoke trained on sequences of at most 512 tokens, which truncated 25 of the 36 training
  conversations of samples/training/financial_advisor_v1.jsonl (the demo's file). With the
  SmolLM2 chat template its 45 conversations are 467 to 759 tokens long, so 768 keeps every
  one whole. Smoke stays a plumbing check (12 steps), and its text says so.

``PRESET_UPDATES`` is also applied by training.catalogue when it recreates presets after a
test database flush.
"""

from django.db import migrations

PRESET_UPDATES = {
    "conservative": {
        "explanation": (
            "A small adapter (rank 8) trained gently (learning rate 1e-4) for 2 epochs. It "
            "changes the model least, so it keeps general knowledge best and rarely diverges. "
            "The cheapest of the three on the same file."
        ),
    },
    "balanced": {
        "explanation": (
            "Rank 16 with learning rate 2e-4 for 3 epochs: enough capacity to learn a voice and "
            "a domain while staying stable. About half as long again as Conservative on the "
            "same file."
        ),
    },
    "aggressive": {
        "explanation": (
            "Rank 32 with learning rate 3e-4 for 4 epochs learns the most from the data but "
            "risks overfitting and forgetting; watch the validation loss. About twice as long "
            "as Conservative on the same file."
        ),
    },
    "smoke": {
        "explanation": (
            "A short real run (12 optimizer steps, sequences up to 768 tokens, a checkpoint every "
            "6 steps) that exercises the whole pipeline - data checks, training, checkpoints, "
            "perplexity, artifacts - in a few minutes on a CPU with SmolLM2-135M. It is a "
            "plumbing check, not a quality claim: expect its validation to fall short of the "
            "quality targets that a real preset aims for."
        ),
        "hyperparameters": {"max_seq_length": 768, "max_steps": 12, "checkpoint_every_steps": 6},
    },
}
OLD_SMOKE_LENGTH = 512


def apply(apps, schema_editor):
    Preset = apps.get_model("training", "Preset")
    for key, update in PRESET_UPDATES.items():
        preset = Preset.objects.filter(key=key).first()
        if preset is None:
            continue
        preset.explanation = update["explanation"]
        if "hyperparameters" in update:
            preset.hyperparameters = {**preset.hyperparameters, **update["hyperparameters"]}
        preset.save(update_fields=["explanation", "hyperparameters"])


def revert(apps, schema_editor):
    Preset = apps.get_model("training", "Preset")
    smoke = Preset.objects.filter(key="smoke").first()
    if smoke is not None:
        smoke.hyperparameters = {**smoke.hyperparameters, "max_seq_length": OLD_SMOKE_LENGTH}
        smoke.save(update_fields=["hyperparameters"])


class Migration(migrations.Migration):
    dependencies = [("training", "0005_runpod_pods")]

    operations = [migrations.RunPython(apply, revert)]
