from django.contrib import admin

from corpora.models import TrainingFile


@admin.register(TrainingFile)
class TrainingFileAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "status",
        "conversation_count",
        "pair_count",
        "size_bytes",
        "uploaded_by",
        "created_at",
    )
    list_filter = ("status", "schema_version")
    search_fields = ("name", "description", "sha256")
    readonly_fields = [f.name for f in TrainingFile._meta.fields]

    def get_queryset(self, request):
        return super().get_queryset(request).with_uploader()
