"""Corpora (documents and chunks), training files, and their exports.

A corpus is ingested from JSONL records valid against ``schemas/corpus/core.v<N>.json``
(plus extension schemas); a training file from ``schemas/training_file/v<N>.json``. Both
are validated in full before anything is written. Exports turn either into JSON, JSONL,
CSV, Parquet or a Hugging Face dataset folder, with splits, a manifest and a version.
"""

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q

from config.longtasks import LongTaskFields


class CorpusQuerySet(models.QuerySet):
    def with_uploader(self):
        return self.select_related("uploaded_by")

    def ready(self):
        return self.exclude(status=Corpus.Status.ARCHIVED)


class Corpus(models.Model):
    """A named collection of documents, each with optional chunks."""

    class Status(models.TextChoices):
        READY = "ready", "Ready"
        PROBLEMS = "problems", "Has problems"
        ARCHIVED = "archived", "Archived"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    schema_version = models.CharField(
        max_length=16, help_text="Core schema version of the stored records"
    )
    source_schema_version = models.CharField(
        max_length=16, help_text="Version the last upload was declared in (older ones upgraded)"
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.READY)
    record_count = models.PositiveIntegerField(default=0, help_text="Documents")
    chunk_count = models.PositiveIntegerField(default=0)
    token_count = models.PositiveBigIntegerField(default=0)
    size_bytes = models.PositiveBigIntegerField(default=0, help_text="Bytes of the uploads")
    checksum = models.CharField(
        max_length=64, blank=True, help_text="SHA-256 over (id, content hash) of every document"
    )
    problems = models.JSONField(default=list, blank=True)
    notes = models.JSONField(default=list, blank=True)
    stats = models.JSONField(default=dict, blank=True)
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True, help_text="Upload date")
    updated_at = models.DateTimeField(auto_now=True)

    objects = CorpusQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "corpora"

    def __str__(self) -> str:
        return f"{self.name} ({self.record_count} documents)"


class CorpusIngestion(models.Model):
    """One accepted upload into a corpus, with its ingestion metrics."""

    class Mode(models.TextChoices):
        CREATE = "create", "New corpus"
        APPEND = "append", "Appended"
        REPLACE = "replace", "Replaced the documents"

    corpus = models.ForeignKey(Corpus, on_delete=models.CASCADE, related_name="ingestions")
    mode = models.CharField(max_length=16, choices=Mode.choices, default=Mode.CREATE)
    original_filename = models.CharField(max_length=255, blank=True)
    storage_path = models.CharField(max_length=500)
    size_bytes = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64, db_index=True)
    schema_version = models.CharField(max_length=16, help_text="Version declared at upload")
    records = models.PositiveIntegerField()
    chunks = models.PositiveIntegerField(default=0)
    seconds = models.FloatField()
    errors = models.PositiveIntegerField(default=0)
    metrics = models.JSONField(default=dict, blank=True)
    notes = models.JSONField(default=list, blank=True)
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.original_filename or self.sha256[:12]} → {self.corpus_id}"

    @property
    def records_per_second(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0


class DocumentQuerySet(models.QuerySet):
    def of_corpus(self, corpus):
        return self.filter(corpus=corpus).order_by("position")

    def listing(self):
        """Everything a list needs, without the (possibly long) text."""
        return self.defer("text")


class Document(models.Model):
    """One record of a corpus: the core fields plus metadata and extension blocks."""

    # Indexes are few on purpose: each one slows ingestion. The unique (corpus,
    # external_id) and (corpus, position) indexes serve the corpus foreign key too.
    # Ingestions go only with their corpus, so nothing cascades through ``ingestion``
    # (DO_NOTHING keeps corpus deletion one DELETE per table; the constraint stays).
    corpus = models.ForeignKey(
        Corpus, on_delete=models.CASCADE, related_name="documents", db_index=False
    )
    ingestion = models.ForeignKey(
        CorpusIngestion,
        null=True,
        on_delete=models.DO_NOTHING,
        related_name="documents",
        db_index=False,
    )
    external_id = models.CharField(max_length=200, help_text="The record's id")
    position = models.PositiveIntegerField(help_text="Order in the corpus, from 0")
    line_number = models.PositiveIntegerField(help_text="Line in the upload it came from")
    title = models.CharField(max_length=500, blank=True)
    text = models.TextField()
    document_type = models.CharField(max_length=64, blank=True)
    author = models.CharField(max_length=300, blank=True)
    date = models.CharField(max_length=10, blank=True)
    language = models.CharField(max_length=32, blank=True)
    source = models.JSONField(default=dict, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    extensions = models.JSONField(default=dict, blank=True)
    char_count = models.PositiveIntegerField(default=0)
    word_count = models.PositiveIntegerField(default=0)
    token_count = models.PositiveIntegerField(default=0)
    chunk_count = models.PositiveIntegerField(default=0)
    sha256 = models.CharField(max_length=64, help_text="Hash of the canonical record")

    objects = DocumentQuerySet.as_manager()

    class Meta:
        ordering = ["corpus", "position"]
        constraints = [
            models.UniqueConstraint(
                fields=["corpus", "external_id"], name="document_id_unique_in_corpus"
            )
        ]
        indexes = [models.Index(fields=["corpus", "position"], name="document_corpus_position")]

    def __str__(self) -> str:
        return self.title or self.external_id


class ChunkQuerySet(models.QuerySet):
    def of_corpus(self, corpus):
        return self.filter(corpus=corpus).order_by("document_id", "position")


class Chunk(models.Model):
    """A span of a document's text, the unit that models read."""

    # One index, the unique (corpus, document, position): it serves both foreign keys.
    # Chunks are deleted with their corpus (or before their documents, by
    # ``corpus_upload(mode="replace")``), never through ``document``: DO_NOTHING keeps
    # those deletes single statements; the constraint is checked at commit.
    corpus = models.ForeignKey(
        Corpus, on_delete=models.CASCADE, related_name="chunks", db_index=False
    )
    document = models.ForeignKey(
        Document, on_delete=models.DO_NOTHING, related_name="chunks", db_index=False
    )
    position = models.PositiveIntegerField()
    text = models.TextField()
    token_count = models.PositiveIntegerField(default=0)
    char_count = models.PositiveIntegerField(default=0)
    start_char = models.PositiveIntegerField(null=True, blank=True)
    end_char = models.PositiveIntegerField(null=True, blank=True)
    metadata = models.JSONField(default=dict, blank=True)

    objects = ChunkQuerySet.as_manager()

    class Meta:
        ordering = ["document_id", "position"]
        constraints = [
            models.UniqueConstraint(
                fields=["corpus", "document", "position"], name="chunk_position_unique"
            )
        ]

    def __str__(self) -> str:
        return f"{self.document_id}#{self.position}"


class TrainingFileQuerySet(models.QuerySet):
    def ready(self):
        return self.filter(status=TrainingFile.Status.READY)

    def with_uploader(self):
        return self.select_related("uploaded_by")


class TrainingFile(models.Model):
    """A validated training file (JSONL of conversations in one of the ``gpu.formats``:
    Crucible's ``schemas/training_file``, OpenAI chat, ShareGPT or Alpaca).

    Only files that pass the schema are stored. ``status`` then says whether every
    conversation is also trainable (ends on an assistant turn, unique ids...); problems
    are listed in ``validation_errors`` and block starting a job with the file.
    """

    class Status(models.TextChoices):
        READY = "ready", "Ready to train"
        PROBLEMS = "problems", "Has problems"

    class Format(models.TextChoices):
        # The keys of gpu.formats.FORMATS: the format detected from the file's first record.
        CRUCIBLE = "crucible", "Crucible"
        OPENAI_CHAT = "openai_chat", "OpenAI chat"
        SHAREGPT = "sharegpt", "ShareGPT"
        ALPACA = "alpaca", "Alpaca"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    schema_version = models.CharField(max_length=16, default="1")
    format = models.CharField(
        max_length=16,
        choices=Format.choices,
        default=Format.CRUCIBLE,
        help_text="The file's format, detected on upload from its first record",
    )
    storage_path = models.CharField(max_length=500)
    original_filename = models.CharField(max_length=255, blank=True)
    size_bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64, db_index=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.READY)
    validation_errors = models.JSONField(default=list, blank=True)
    conversation_count = models.PositiveIntegerField(default=0)
    pair_count = models.PositiveIntegerField(
        default=0, help_text="Assistant turns (training pairs)"
    )
    word_count = models.PositiveBigIntegerField(default=0)
    token_count = models.PositiveBigIntegerField(
        default=0, help_text="Approximate tokens (corpora.tokens)"
    )
    stats = models.JSONField(default=dict, blank=True)
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TrainingFileQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.conversation_count} conversations)"

    @property
    def is_ready(self) -> bool:
        return self.status == self.Status.READY


class ExportQuerySet(models.QuerySet):
    def with_source(self):
        return self.select_related("corpus", "training_file", "created_by")

    def succeeded(self):
        return self.filter(status=Export.Status.SUCCEEDED)

    def series(self, *, corpus_id=None, training_file_id=None, unit: str):
        """Earlier exports of the same source and unit: one versioned dataset."""
        return self.filter(corpus_id=corpus_id, training_file_id=training_file_id, unit=unit)


class Export(models.Model):
    """A batch export of a corpus or training file, in one or more formats."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Ready"
        FAILED = "failed", "Failed"

    class Unit(models.TextChoices):
        DOCUMENTS = "documents", "Documents"
        CHUNKS = "chunks", "Chunks"
        CONVERSATIONS = "conversations", "Conversations"

    FORMATS = ("json", "jsonl", "csv", "parquet", "hf", "openai_chat")

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    corpus = models.ForeignKey(
        Corpus, null=True, blank=True, on_delete=models.CASCADE, related_name="exports"
    )
    training_file = models.ForeignKey(
        TrainingFile, null=True, blank=True, on_delete=models.CASCADE, related_name="exports"
    )
    unit = models.CharField(max_length=16, choices=Unit.choices)
    formats = models.JSONField(default=list)
    parameters = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    progress = models.FloatField(default=0.0, help_text="0 to 1")
    progress_message = models.CharField(max_length=200, blank=True)
    version = models.CharField(max_length=32, blank=True)
    changelog = models.JSONField(default=list, blank=True)
    manifest = models.JSONField(default=dict, blank=True)
    files = models.JSONField(default=list, blank=True)
    content_fingerprint = models.CharField(max_length=64, blank=True)
    row_count = models.PositiveIntegerField(default=0)
    storage_prefix = models.CharField(max_length=300, blank=True)
    error = models.TextField(blank=True)
    task_id = models.CharField(max_length=64, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = ExportQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(corpus__isnull=False, training_file__isnull=True)
                | Q(corpus__isnull=True, training_file__isnull=False),
                name="export_has_one_source",
            )
        ]

    def __str__(self) -> str:
        return f"Export {self.version or '(pending)'} of {self.source_name}"

    @property
    def source_name(self) -> str:
        source = self.corpus or self.training_file
        return source.name if source else "?"

    @property
    def is_finished(self) -> bool:
        return self.status in (self.Status.SUCCEEDED, self.Status.FAILED)

    @property
    def progress_percent(self) -> int:
        return round(self.progress * 100)

    def mark_failed(self, message: str) -> None:
        from django.utils import timezone

        self.status = self.Status.FAILED
        self.error = message[:2000]
        self.finished_at = timezone.now()
        self.save(update_fields=["status", "error", "finished_at"])


# --- RAG knowledge bases (corpora/rag/) --------------------------------------------------------


class KnowledgeBaseQuerySet(models.QuerySet):
    def for_list(self):
        return self.select_related("created_by").prefetch_related("corpora")


class KnowledgeBase(LongTaskFields):
    """A vector index over the chunks of one or more corpora (all, or those matching a
    metadata filter), embedded with one registry embedding model.

    The vectors live in storage, one ``.npy`` file per segment (normalised float32) beside a
    ``.npy`` of the chunk ids; ``manifest`` lists the visible segments, their tombstoned rows
    and the approximate index, and is switched with ``version`` in one UPDATE when a build or
    update finishes, so a query never sees a half-written index.
    """

    class Status(models.TextChoices):
        BUILDING = "building", "Building"
        READY = "ready", "Ready"
        UPDATING = "updating", "Updating"
        FAILED = "failed", "Failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    corpora = models.ManyToManyField(Corpus, related_name="knowledge_bases")
    chunk_filter = models.JSONField(
        default=dict, blank=True, help_text="Equality filter on chunk or document metadata"
    )
    embedding_model = models.CharField(max_length=300, default="offline/all-minilm-l6-v2")
    dimensions = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.BUILDING)
    progress = models.FloatField(default=0.0, help_text="0 to 1, of the running build")
    progress_message = models.CharField(max_length=300, blank=True)
    error = models.TextField(blank=True)
    version = models.PositiveIntegerField(default=0, help_text="0 until the first build")
    manifest = models.JSONField(default=dict, blank=True)
    chunk_count = models.PositiveIntegerField(default=0, help_text="Visible vectors")
    document_count = models.PositiveIntegerField(default=0)
    tombstone_count = models.PositiveIntegerField(default=0)
    size_bytes = models.PositiveBigIntegerField(default=0)
    checksum = models.CharField(
        max_length=64, blank=True, help_text="SHA-256 over (chunk id, content hash) of its chunks"
    )
    recall_at_10 = models.FloatField(
        null=True, blank=True, help_text="Approximate index against exact search, at build"
    )
    last_build = models.JSONField(default=dict, blank=True, help_text="Counts of the last run")
    update_requested = models.BooleanField(default=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    built_at = models.DateTimeField(null=True, blank=True, help_text="First build finished")
    refreshed_at = models.DateTimeField(null=True, blank=True, help_text="Last update finished")

    objects = KnowledgeBaseQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name

    @property
    def is_queryable(self) -> bool:
        return self.version > 0

    @property
    def is_working(self) -> bool:
        return self.status in (self.Status.BUILDING, self.Status.UPDATING)

    @property
    def progress_percent(self) -> int:
        return round(self.progress * 100)

    @property
    def is_approximate(self) -> bool:
        return bool((self.manifest or {}).get("ann"))


class KnowledgeBaseEntry(models.Model):
    """One embedded chunk of a knowledge base: where its vector is (segment, row) and the
    content hash it was embedded from. A removed or changed chunk's entry is tombstoned (its
    row is hidden from search) until a compaction rewrites the segments."""

    knowledge_base = models.ForeignKey(
        KnowledgeBase, on_delete=models.CASCADE, related_name="entries"
    )
    chunk_id = models.BigIntegerField(help_text="corpora.Chunk id (no FK: corpora replace chunks)")
    document_id = models.BigIntegerField()
    content_hash = models.CharField(max_length=64)
    segment = models.PositiveIntegerField()
    row = models.PositiveIntegerField()
    tombstoned = models.BooleanField(default=False)

    class Meta:
        indexes = [models.Index(fields=["knowledge_base", "chunk_id"], name="kb_entry_chunk")]

    def __str__(self) -> str:
        return f"{self.knowledge_base_id}:{self.chunk_id}@{self.segment}/{self.row}"
