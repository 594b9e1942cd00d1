"""The built-in catalogue: presets and base models, created when missing.

The data migrations seeded them first; this runs after every `migrate` and every test
database flush (post_migrate), so they exist even after a flush. It never changes rows
that exist, so admin edits stay.
"""

import importlib

_seed = importlib.import_module("training.migrations.0002_presets_and_base_models")
_updates = importlib.import_module("training.migrations.0006_preset_texts_and_smoke_length")
SMOKE_OVERRIDES = {"max_steps": 12, "checkpoint_every_steps": 6}


def ensure_catalogue(sender=None, **kwargs) -> None:
    from training.models import BaseModel, Preset

    for preset in _seed.PRESETS:
        values = dict(preset)
        if values["key"] == "smoke":
            values["hyperparameters"] = {**values["hyperparameters"], **SMOKE_OVERRIDES}
        update = _updates.PRESET_UPDATES.get(values["key"], {})
        values["explanation"] = update.get("explanation", values["explanation"])
        values["hyperparameters"] = {
            **values["hyperparameters"],
            **update.get("hyperparameters", {}),
        }
        Preset.objects.get_or_create(key=values["key"], defaults=values)
    for model in _seed.BASE_MODELS:
        BaseModel.objects.get_or_create(name=model["name"], defaults=model)
