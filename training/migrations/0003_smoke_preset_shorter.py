"""Smoke preset: 12 steps with checkpoints every 6, so a CPU run stays within minutes."""

from django.db import migrations


def shorten(apps, schema_editor):
    Preset = apps.get_model("training", "Preset")
    smoke = Preset.objects.filter(key="smoke").first()
    if smoke is None:
        return
    smoke.hyperparameters = {**smoke.hyperparameters, "max_steps": 12, "checkpoint_every_steps": 6}
    smoke.explanation = (
        "A short real run (12 optimizer steps, sequences up to 512 tokens, a checkpoint every 6 "
        "steps) that exercises the whole pipeline - data checks, training, checkpoints, "
        "perplexity, artifacts - in a few minutes on a CPU with SmolLM2-135M. It proves the "
        "set-up works; it is not meant to produce a useful model."
    )
    smoke.save()


class Migration(migrations.Migration):
    dependencies = [("training", "0002_presets_and_base_models")]

    operations = [migrations.RunPython(shorten, migrations.RunPython.noop)]
