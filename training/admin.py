from django.contrib import admin

from training.models import (
    Artifact,
    BaseModel,
    Checkpoint,
    JobTemplate,
    JobTransition,
    MetricPoint,
    Preset,
    Recovery,
    TrainingJob,
    WebhookEvent,
)


@admin.register(BaseModel)
class BaseModelAdmin(admin.ModelAdmin):
    list_display = (
        "display_name",
        "name",
        "source",
        "parameters",
        "context_length",
        "licence",
        "is_active",
    )
    list_filter = ("source", "is_active", "gated")


@admin.register(Preset)
class PresetAdmin(admin.ModelAdmin):
    list_display = ("name", "key", "summary", "is_default", "position")


class TransitionInline(admin.TabularInline):
    model = JobTransition
    extra = 0
    readonly_fields = ("from_status", "to_status", "reason", "at")
    can_delete = False


class RecoveryInline(admin.TabularInline):
    model = Recovery
    extra = 0
    readonly_fields = ("reason", "detected_at", "relaunched_at", "from_step")
    can_delete = False


@admin.register(TrainingJob)
class TrainingJobAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "status",
        "progress",
        "preset",
        "base_model",
        "recovery_count",
        "created_by",
        "created_at",
    )
    list_filter = ("status", "executor", "preset", "base_model")
    search_fields = ("name", "notes", "error_message")
    readonly_fields = ("id", "webhook_secret", "created_at", "updated_at")
    inlines = [TransitionInline, RecoveryInline]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("preset", "base_model", "created_by")


class ReadOnlyAdmin(admin.ModelAdmin):
    """Records the platform writes (webhook events, metrics, checkpoints): viewable, never
    added or edited by hand, so the admin cannot make them disagree with what the worker sent.
    Deleting stays possible for cleaning up."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(WebhookEvent)
class WebhookEventAdmin(ReadOnlyAdmin):
    list_display = ("event_id", "job", "type", "sequence", "processed", "received_at")
    list_filter = ("type", "processed")
    readonly_fields = [f.name for f in WebhookEvent._meta.fields]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("job")


@admin.register(MetricPoint)
class MetricPointAdmin(ReadOnlyAdmin):
    list_display = ("job", "step", "epoch", "train_loss", "val_loss", "recorded_at")
    list_select_related = ("job",)


@admin.register(Checkpoint)
class CheckpointAdmin(ReadOnlyAdmin):
    list_display = ("job", "step", "uri", "size_bytes", "created_at")
    list_select_related = ("job",)


for model in (Artifact, JobTemplate):
    admin.site.register(model)
