from django import forms
from django.contrib import admin

from jobs.models import GatewaySettings, Provider, RegisteredModel


class ProviderForm(forms.ModelForm):
    """The API key is write-only: entered here, stored encrypted, never shown back."""

    new_api_key = forms.CharField(
        required=False,
        widget=forms.PasswordInput(render_value=False),
        help_text="Leave blank to keep the stored key.",
    )

    class Meta:
        model = Provider
        fields = (
            "slug",
            "name",
            "kind",
            "base_url",
            "enabled",
            "requests_per_minute",
            "tokens_per_minute",
            "timeout_s",
        )

    def save(self, commit=True):
        provider = super().save(commit=False)
        if self.cleaned_data.get("new_api_key"):
            provider.set_api_key(self.cleaned_data["new_api_key"])
        if commit:
            provider.save()
        return provider


class RegisteredModelInline(admin.TabularInline):
    model = RegisteredModel
    extra = 0
    fields = ("remote_id", "key", "enabled", "price_input_per_m", "price_output_per_m")
    readonly_fields = ("key",)
    show_change_link = True


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    form = ProviderForm
    list_display = ("slug", "name", "kind", "base_url", "enabled", "api_key_last4")
    readonly_fields = ("api_key_last4", "created_at", "updated_at")
    inlines = [RegisteredModelInline]


@admin.register(RegisteredModel)
class RegisteredModelAdmin(admin.ModelAdmin):
    list_display = (
        "key",
        "display_name",
        "enabled",
        "price_input_per_m",
        "price_output_per_m",
        "price_source",
        "allow_unpriced",
        "last_seen_at",
    )
    list_filter = ("provider", "enabled", "allow_unpriced")
    search_fields = ("key", "display_name")
    list_select_related = ("provider",)


@admin.register(GatewaySettings)
class GatewaySettingsAdmin(admin.ModelAdmin):
    list_display = ("__str__", "retry_attempts", "timeout_s", "deadline_s", "cache_ttl_s")

    def has_add_permission(self, request):
        return not GatewaySettings.objects.exists()

    def has_delete_permission(self, request, obj=None):
        return False
