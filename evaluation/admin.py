from django.contrib import admin

from evaluation.models import (
    Approval,
    GeneratedResponse,
    HumanRating,
    JudgeScore,
    RatingPair,
    Report,
    ShareLink,
    ValidationRun,
)


class ReadOnly(admin.ModelAdmin):
    """Validation records are evidence: the admin shows them, the workflows write them."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(ValidationRun)
class ValidationRunAdmin(ReadOnly):
    list_display = ("job", "status", "progress", "stage", "trigger", "created_at", "completed_at")
    list_filter = ("status", "trigger")
    search_fields = ("job__name",)
    list_select_related = ("job",)


@admin.register(GeneratedResponse)
class GeneratedResponseAdmin(ReadOnly):
    list_display = ("run", "suite", "item_id", "side", "stopped", "new_tokens")
    list_filter = ("suite", "side", "stopped")
    list_select_related = ("run__job",)


@admin.register(JudgeScore)
class JudgeScoreAdmin(ReadOnly):
    list_display = ("response", "judge", "scores", "created_at")
    list_select_related = ("response",)


@admin.register(RatingPair)
class RatingPairAdmin(ReadOnly):
    list_display = ("run", "rater", "suite", "item_id", "left_side", "created_at")
    list_select_related = ("run__job", "rater")


@admin.register(HumanRating)
class HumanRatingAdmin(ReadOnly):
    list_display = ("run", "rater", "suite", "item_id", "created_at")
    list_select_related = ("run__job", "rater")


@admin.register(Report)
class ReportAdmin(ReadOnly):
    list_display = ("run", "version", "size_bytes", "sha256", "created_at", "download_count")
    list_select_related = ("run__job",)


@admin.register(ShareLink)
class ShareLinkAdmin(ReadOnly):
    list_display = ("report", "state", "expires_at", "revoked_at", "download_count")
    exclude = ("token",)
    list_select_related = ("report__run__job",)


@admin.register(Approval)
class ApprovalAdmin(ReadOnly):
    list_display = ("job", "decision", "decided_by", "decided_at")
    list_filter = ("decision",)
    list_select_related = ("job", "decided_by")
