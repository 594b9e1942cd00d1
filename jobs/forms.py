"""Forms of the gateway settings page: they parse and type the fields; the rules live in
jobs/services.py (the API uses the same services)."""

from __future__ import annotations

from django import forms

from jobs.models import GatewaySettings, Provider


class ProviderForm(forms.Form):
    slug = forms.SlugField(max_length=64, required=False)
    name = forms.CharField(max_length=120, required=False)
    kind = forms.ChoiceField(choices=Provider.Kind.choices, initial=Provider.Kind.OPENAI)
    base_url = forms.URLField(max_length=300, required=False, assume_scheme="https")
    api_key = forms.CharField(
        max_length=500,
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False),
        help_text="Stored encrypted; leave blank to keep the current key.",
    )
    clear_api_key = forms.BooleanField(required=False)
    enabled = forms.BooleanField(required=False)
    requests_per_minute = forms.IntegerField(min_value=1, required=False)
    tokens_per_minute = forms.IntegerField(min_value=1, required=False)
    timeout_s = forms.FloatField(min_value=0.1, max_value=3600, required=False)


class ModelRowForm(forms.Form):
    enabled = forms.BooleanField(required=False)
    allow_unpriced = forms.BooleanField(required=False)
    price_input_per_m = forms.DecimalField(
        min_value=0, max_digits=12, decimal_places=6, required=False
    )
    price_output_per_m = forms.DecimalField(
        min_value=0, max_digits=12, decimal_places=6, required=False
    )
    requests_per_minute = forms.IntegerField(min_value=1, required=False)
    tokens_per_minute = forms.IntegerField(min_value=1, required=False)


class SettingsForm(forms.Form):
    default_runs = forms.IntegerField(label="Default run count", min_value=1, max_value=50)
    retry_attempts = forms.IntegerField(label="Attempts per call", min_value=1, max_value=20)
    backoff_base_s = forms.FloatField(label="Backoff base (s)", min_value=0.01, max_value=60)
    backoff_cap_s = forms.FloatField(label="Backoff cap (s)", min_value=0.1, max_value=600)
    timeout_s = forms.FloatField(label="Per-request timeout (s)", min_value=1, max_value=3600)
    deadline_s = forms.FloatField(label="Overall deadline (s)", min_value=1, max_value=86400)
    cache_ttl_s = forms.IntegerField(label="Cache TTL (s)", min_value=0, max_value=90 * 86400)
    breaker_failure_threshold = forms.IntegerField(
        label="Breaker opens after (failures)", min_value=1, max_value=100
    )
    breaker_reset_s = forms.FloatField(
        label="Breaker half-opens after (s)", min_value=1, max_value=3600
    )

    def __init__(self, *args, overridden: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # A value the environment sets is shown read-only (the environment wins).
        for name in overridden or []:
            self.fields[name].disabled = True
            self.fields[name].required = False

    @staticmethod
    def initial_from(obj: GatewaySettings) -> dict:
        return obj.effective()
