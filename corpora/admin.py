"""Corpora, documents, chunks, training files and exports in the admin (read-only:
they change only through uploads and exports, which keep counts and checksums right)."""

from django.contrib import admin

from corpora.models import Chunk, Corpus, CorpusIngestion, Document, Export, TrainingFile


class ReadOnlyAdmin(admin.ModelAdmin):
    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class IngestionInline(admin.TabularInline):
    model = CorpusIngestion
    fields = ("created_at", "mode", "original_filename", "schema_version", "records", "seconds")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Corpus)
class CorpusAdmin(ReadOnlyAdmin):
    list_display = (
        "name",
        "status",
        "record_count",
        "chunk_count",
        "schema_version",
        "size_bytes",
        "uploaded_by",
        "created_at",
    )
    list_filter = ("status", "schema_version")
    search_fields = ("name", "description", "checksum")
    inlines = [IngestionInline]

    def get_queryset(self, request):
        return super().get_queryset(request).with_uploader()


@admin.register(CorpusIngestion)
class CorpusIngestionAdmin(ReadOnlyAdmin):
    list_display = ("corpus", "mode", "records", "chunks", "size_bytes", "seconds", "created_at")
    list_filter = ("mode", "schema_version")
    list_select_related = ("corpus",)

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Document)
class DocumentAdmin(ReadOnlyAdmin):
    list_display = (
        "external_id",
        "title",
        "corpus",
        "document_type",
        "language",
        "token_count",
        "chunk_count",
    )
    list_filter = ("document_type", "language")
    search_fields = ("external_id", "title")
    list_select_related = ("corpus",)
    show_full_result_count = False

    def has_delete_permission(self, request, obj=None):
        return False  # a corpus changes through uploads (append / replace)


@admin.register(Chunk)
class ChunkAdmin(ReadOnlyAdmin):
    list_display = ("document", "position", "token_count", "char_count", "corpus")
    list_select_related = ("document", "corpus")
    show_full_result_count = False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(TrainingFile)
class TrainingFileAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "status",
        "conversation_count",
        "pair_count",
        "token_count",
        "size_bytes",
        "uploaded_by",
        "created_at",
    )
    list_filter = ("status", "schema_version")
    search_fields = ("name", "description", "sha256")
    readonly_fields = [f.name for f in TrainingFile._meta.fields]

    def get_queryset(self, request):
        return super().get_queryset(request).with_uploader()


@admin.register(Export)
class ExportAdmin(ReadOnlyAdmin):
    list_display = ("__str__", "status", "unit", "version", "row_count", "created_by", "created_at")
    list_filter = ("status", "unit")
    list_select_related = ("corpus", "training_file", "created_by")
