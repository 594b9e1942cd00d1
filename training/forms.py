"""The new-job form: field validation here, the workflow in training.services."""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.template.defaultfilters import filesizeformat

from config.errors import CrucibleError, InvalidInput
from corpora.models import TrainingFile
from training import hooks
from training.config import Hyperparameters, resolve_configuration
from training.models import BaseModel, Preset, TrainingJob

# The hyperparameters the advanced section offers (the rest keep the preset's value).
ADVANCED_FIELDS = [
    "learning_rate",
    "num_epochs",
    "max_steps",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "micro_batch_size",
    "gradient_accumulation_steps",
    "max_seq_length",
    "warmup_ratio",
    "lr_scheduler",
]
# Longer help than the schema's one-liners, for people choosing a value.
ADVANCED_HELP = {
    "learning_rate": "Peak learning rate. Higher learns faster but can diverge; 1e-4 to 3e-4 "
    "is typical for LoRA.",
    "num_epochs": "Passes over the training split. More epochs fit the data more closely and "
    "risk overfitting; watch the validation loss.",
    "max_steps": "Stop after this many optimizer steps, whatever the epochs say. Leave empty "
    "to train every epoch.",
    "lora_r": "Rank of the adapter: its capacity. 8 is light, 16 balanced, 32 and up for "
    "complex data; cost and memory grow with it.",
    "lora_alpha": "Scales the adapter's update; usually twice the rank.",
    "lora_dropout": "Dropout on the adapter, a little regularisation for small datasets.",
    "micro_batch_size": "Sequences per forward pass. Lower it after an out-of-memory error.",
    "gradient_accumulation_steps": "Micro-batches per optimizer step; effective batch = micro "
    "batch x this. Raise it when you lower the micro batch to keep the same effective batch.",
    "max_seq_length": "Tokens per sequence; longer conversations are truncated. Memory grows "
    "with it.",
    "warmup_ratio": "Share of the steps spent ramping the learning rate up from zero.",
    "lr_scheduler": "How the learning rate falls after warm-up.",
}
SPOT_CHOICES = [
    ("spot", "Spot"),
    ("on_demand", "On-demand"),
]


def _file_label(training_file: TrainingFile) -> str:
    state = "ready" if training_file.is_ready else "has problems"
    return (
        f"{training_file.name} · {training_file.conversation_count:,} conversations · "
        f"{filesizeformat(training_file.size_bytes)} · {state}"
    )


class FileChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, obj: TrainingFile) -> str:
        return _file_label(obj)


def runpod_available() -> bool:
    """RunPod can launch here: its executor exists and an API key is configured."""
    from training.executors import get_executor

    if not getattr(settings, "RUNPOD_API_KEY", ""):
        return False
    try:
        get_executor(TrainingJob.Executor.RUNPOD)
    except Exception:
        return False
    return True


class NewJobForm(forms.Form):
    training_file = FileChoiceField(
        queryset=TrainingFile.objects.order_by("-created_at"),
        empty_label="Choose a training file",
        help_text="A validated JSONL file of conversations (Datasets → Training files).",
    )
    base_model = forms.ModelChoiceField(
        queryset=BaseModel.objects.filter(is_active=True),
        to_field_name="name",
        empty_label=None,
    )
    preset = forms.ModelChoiceField(
        queryset=Preset.objects.all(),
        to_field_name="key",
        empty_label=None,
        widget=forms.RadioSelect,
    )
    executor = forms.ChoiceField(
        choices=TrainingJob.Executor.choices,
        initial=TrainingJob.Executor.LOCAL,
        widget=forms.RadioSelect,
    )
    # Billing's GPU types (training/hooks.py's Pricing), set per form in __init__.
    gpu_type = forms.ModelChoiceField(
        queryset=None,
        to_field_name="gpu_type",
        required=False,
        empty_label="Default GPU",
        label="GPU type",
    )
    capacity = forms.ChoiceField(
        choices=SPOT_CHOICES,
        initial="spot",
        required=False,
        widget=forms.RadioSelect,
        label="Capacity",
    )
    advanced = forms.BooleanField(required=False, label="Override hyperparameters")
    name = forms.CharField(
        max_length=255, required=False, help_text="Leave empty for '<model> on <file>'."
    )
    description = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), required=False)
    notes = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 2}),
        required=False,
        help_text="What this run tests, e.g. 'aggressive LR on the high-emotion set'.",
    )
    tags = forms.CharField(
        max_length=500,
        required=False,
        help_text="Comma-separated, e.g. experiment, client:acme.",
    )
    override_reason = forms.CharField(
        max_length=500,
        required=False,
        label="Budget override reason",
        help_text="Admins only: start this job even over the monthly budget, with a reason "
        "for the audit log.",
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pricing = hooks.pricing()
        if pricing is not None:
            self.fields["gpu_type"].queryset = pricing.gpu_types()
        else:  # no price catalogue: only the default GPU type
            self.fields["gpu_type"] = forms.ChoiceField(
                choices=[("", "Default GPU")], required=False, label="GPU type"
            )
        default = Preset.objects.filter(is_default=True).first()
        if default is not None:
            self.fields["preset"].initial = default.key
        smallest = BaseModel.objects.filter(is_active=True).first()
        if smallest is not None:
            self.fields["base_model"].initial = smallest.name
        schema = Hyperparameters.model_fields
        for key in ADVANCED_FIELDS:
            info = schema[key]
            label = key.replace("_", " ").capitalize().replace("Lora", "LoRA").replace("Lr", "LR")
            if key == "lr_scheduler":
                field = forms.ChoiceField(
                    choices=[("", "Preset's")]
                    + [(v, v.replace("_", " ")) for v in ("cosine", "linear", "constant")],
                    required=False,
                )
            elif info.annotation in (int, int | None):
                field = forms.IntegerField(required=False)
            else:
                field = forms.FloatField(required=False)
            field.label = label
            field.help_text = ADVANCED_HELP.get(key, info.description or "")
            self.fields[f"hp_{key}"] = field

    # --- Derived values ---------------------------------------------------------------------

    def advanced_fields(self):
        return [self[f"hp_{key}"] for key in ADVANCED_FIELDS]

    def overrides(self) -> dict:
        data = self.cleaned_data
        if not data.get("advanced"):
            return {}
        return {
            key: data[f"hp_{key}"]
            for key in ADVANCED_FIELDS
            if data.get(f"hp_{key}") not in (None, "")
        }

    def tag_list(self) -> list[str]:
        raw = self.cleaned_data.get("tags") or ""
        return sorted({t.strip().lower() for t in raw.split(",") if t.strip()})

    @property
    def spot(self) -> bool:
        return (
            self.cleaned_data.get("executor") == TrainingJob.Executor.RUNPOD
            and self.cleaned_data.get("capacity") == "spot"
        )

    @property
    def gpu_type_key(self) -> str:
        if self.cleaned_data.get("executor") != TrainingJob.Executor.RUNPOD:
            return ""
        price = self.cleaned_data.get("gpu_type")
        return price.gpu_type if price else ""

    # --- Validation ---------------------------------------------------------------------------

    def clean_tags(self) -> str:
        raw = self.cleaned_data.get("tags") or ""
        tags = [t.strip() for t in raw.split(",") if t.strip()]
        if len(tags) > 20:
            raise forms.ValidationError("At most 20 tags.")
        if any(len(t) > 50 for t in tags):
            raise forms.ValidationError("Tags are at most 50 characters each.")
        return raw

    def clean(self):
        data = super().clean()
        training_file = data.get("training_file")
        if training_file is not None and not training_file.is_ready:
            first = (training_file.validation_errors or [{}])[0]
            self.add_error(
                "training_file",
                f"This file has problems and cannot be trained on: line {first.get('line')}: "
                f"{first.get('message')}",
            )
        if data.get("executor") == TrainingJob.Executor.RUNPOD and not runpod_available():
            self.add_error(
                "executor",
                "RunPod is not configured on this installation (an admin sets RUNPOD_API_KEY); "
                "use the local executor.",
            )
        base_model = data.get("base_model")
        if base_model is not None and not self.errors:
            preset = data.get("preset")
            try:
                self.configuration = resolve_configuration(
                    preset_hyperparameters=preset.hyperparameters if preset else {},
                    overrides=self.overrides(),
                    context_length=base_model.context_length,
                )
            except InvalidInput as exc:
                fields = (exc.details or {}).get("fields") or []
                for problem in fields:
                    name = f"hp_{problem['field']}"
                    if name in self.fields:
                        self.add_error(name, problem["message"])
                if not any(f"hp_{p['field']}" in self.fields for p in fields):
                    self.add_error(None, exc.message)
        return data


class AnnotateForm(forms.Form):
    """Notes and tags of an existing job."""

    notes = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), required=False)
    tags = forms.CharField(max_length=500, required=False)

    clean_tags = NewJobForm.clean_tags
    tag_list = NewJobForm.tag_list


def preset_cards(form: NewJobForm) -> list[Preset]:
    """Every preset, each with ``figures`` for the file the form has chosen: optimizer steps,
    epochs over the training split, and the estimated time and cost on the chosen executor
    (the preset's own values, without the form's overrides). No file chosen, or no cost
    figures registered (training/hooks.py's Pricing): no figures."""
    pricing = hooks.pricing()
    presets = list(Preset.objects.all())
    if form.is_bound:
        form.is_valid()  # fills cleaned_data with the fields that are valid
    data = getattr(form, "cleaned_data", {}) or {}
    training_file, base_model = data.get("training_file"), data.get("base_model")
    executor = data.get("executor") or TrainingJob.Executor.LOCAL
    runpod = executor == TrainingJob.Executor.RUNPOD
    for preset in presets:
        preset.figures = None
        if (
            pricing is None
            or training_file is None
            or base_model is None
            or not training_file.is_ready
        ):
            continue
        try:
            est = pricing.estimate(
                training_file=training_file,
                base_model=base_model,
                preset=preset,
                gpu_type=form.gpu_type_key if hasattr(form, "cleaned_data") else "",
                spot=form.spot if hasattr(form, "cleaned_data") else False,
                executor=executor,
            )
        except (CrucibleError, KeyError, ValueError):
            continue  # e.g. a preset whose sequence length the model cannot take
        epochs = est.tokens_processed / est.train_tokens if est.train_tokens else None
        duration = est.duration_seconds
        cost = est.cost
        preset.figures = {
            "file": training_file.name,
            "steps": est.steps,
            "epochs": epochs,
            "duration": pricing.range_text(duration["low"], duration["high"]),
            "cost": pricing.money_text(float(cost["low"]), float(cost["high"])) if runpod else None,
        }
    return presets
