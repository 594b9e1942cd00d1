from django.contrib import admin

from billing.models import (
    AuditEntry,
    BudgetAlert,
    GpuPrice,
    JobCost,
    LedgerEntry,
    LlmCall,
    LlmReservation,
    MonthlyBudget,
    NotificationLog,
    NotificationPreference,
)


@admin.register(GpuPrice)
class GpuPriceAdmin(admin.ModelAdmin):
    list_display = (
        "gpu_type",
        "display_name",
        "spot_per_hour",
        "on_demand_per_hour",
        "source",
        "updated_at",
        "is_active",
    )
    list_editable = ("spot_per_hour", "on_demand_per_hour", "is_active")
    search_fields = ("gpu_type", "display_name")


@admin.register(MonthlyBudget)
class MonthlyBudgetAdmin(admin.ModelAdmin):
    list_display = (
        "month",
        "amount",
        "approval_threshold",
        "hard_cap_percent",
        "updated_by",
        "updated_at",
    )
    readonly_fields = ("updated_by", "updated_at")

    def save_model(self, request, obj, form, change):
        obj.updated_by = request.user
        super().save_model(request, obj, form, change)
        AuditEntry.objects.create(
            action=AuditEntry.Action.BUDGET_SET,
            user=request.user,
            reason="set in the admin",
            details={"month": f"{obj.month:%Y-%m}", "amount": str(obj.amount)},
        )


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ("day", "kind", "description", "attribution", "quantity", "unit", "amount")
    list_filter = ("kind", "month")
    search_fields = ("object_id", "description", "attribution")


@admin.register(JobCost)
class JobCostAdmin(ReadOnlyAdmin):
    list_display = (
        "job",
        "gpu_type",
        "spot",
        "rate_per_hour",
        "estimate_cost",
        "accrued",
        "reserved",
        "overridden_at",
        "capped_at",
    )
    list_select_related = ("job",)


@admin.register(BudgetAlert)
class BudgetAlertAdmin(ReadOnlyAdmin):
    list_display = ("month", "threshold", "spent", "budget", "forecast", "sent_at")


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "action", "job", "user", "reason")
    list_filter = ("action",)
    list_select_related = ("job", "user")


@admin.register(NotificationLog)
class NotificationLogAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "kind", "channel", "recipients", "subject", "ok")
    list_filter = ("kind", "channel", "ok")


admin.site.register(NotificationPreference)


@admin.register(LlmCall)
class LlmCallAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "model",
        "feature",
        "user",
        "prompt_tokens",
        "completion_tokens",
        "cost",
        "latency_ms",
        "attempts",
        "cached",
        "outcome",
    )
    list_filter = ("feature", "cached", "provider", "outcome")
    search_fields = ("model", "request_id", "attribution")
    date_hierarchy = "created_at"
    list_select_related = ("user",)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(LlmReservation)
class LlmReservationAdmin(admin.ModelAdmin):
    list_display = ("created_at", "model", "feature", "amount", "expires_at", "request_id")

    def has_add_permission(self, request):
        return False
