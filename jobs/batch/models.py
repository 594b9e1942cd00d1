"""Batch LLM jobs: frameworks (versioned prompt + answer schema), jobs that freeze every
parameter for audit, one task row per (chunk x framework x model x run), and the statistics
snapshot the results viewer reads."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from config.longtasks import LongTaskFields


class Framework(models.Model):
    name = models.SlugField(max_length=63, unique=True)
    title = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class FrameworkVersion(models.Model):
    """One version of a framework's content; its content never changes (the sync refuses)."""

    framework = models.ForeignKey(Framework, on_delete=models.CASCADE, related_name="versions")
    version = models.CharField(max_length=32)
    sha256 = models.CharField(max_length=64)
    content = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["framework__name", "-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["framework", "version"], name="batch_framework_version")
        ]

    def __str__(self) -> str:
        return f"{self.framework.name}@{self.version}"

    @property
    def label(self) -> str:
        return f"{self.framework.name}@{self.version}"

    @property
    def fields(self) -> list[dict]:
        return self.content["fields"]


class BatchJobQuerySet(models.QuerySet):
    def active(self):
        return self.filter(status__in=BatchJob.ACTIVE)

    def frameworks(self):
        """Jobs of frameworks over corpus chunks (the batch pages and ``/api/v1/jobs``); other
        kinds (a batch evaluation) have their own pages."""
        return self.filter(kind=BatchJob.FRAMEWORK)


class BatchJob(models.Model):
    class Status(models.TextChoices):
        RUNNING = "running", "Running"
        PAUSED = "paused", "Paused"
        COMPLETED = "completed", "Completed"
        FAILED = "failed", "Completed with failures"
        CANCELLED = "cancelled", "Cancelled"

    ACTIVE = (Status.RUNNING, Status.PAUSED)
    FRAMEWORK = "framework"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    kind = models.CharField(
        max_length=32,
        default=FRAMEWORK,
        db_index=True,
        help_text="What its tasks do (jobs/batch/kinds.py): 'framework' (a framework over corpus "
        "chunks) or a kind another app registers ('eval': a rubric over dataset samples)",
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    corpus = models.ForeignKey(
        "corpora.Corpus",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="batch_jobs",
        help_text="The corpus of a framework job",
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    selection = models.JSONField(default=dict, help_text="What was asked: ids or a filter")
    frozen = models.JSONField(
        default=dict,
        help_text="Framework versions and hashes, model ids and revisions, decoding, runs, "
        "code version, chunk ids with their text hashes",
    )
    parameters_sha256 = models.CharField(max_length=64, help_text="Hash of the frozen parameters")
    runs = models.PositiveSmallIntegerField()
    task_count = models.PositiveIntegerField(default=0)
    estimate_prompt_tokens = models.PositiveBigIntegerField(default=0)
    estimate_completion_tokens = models.PositiveBigIntegerField(default=0)
    estimate_cost = models.DecimalField(max_digits=14, decimal_places=8, default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = BatchJobQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.pk})"

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE


class BatchTask(LongTaskFields):
    """One (input x model x run): for a framework job the input is a chunk and a framework
    version; for another kind, ``item_id`` names the kind's input row (an evaluation sample).
    The id is derived from those and the job (sha256), so it doubles as the OpenAI batch
    ``custom_id``, and running a task twice can only ever store one result."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    OPEN = (Status.PENDING, Status.QUEUED, Status.RUNNING)

    id = models.CharField(primary_key=True, max_length=40)
    job = models.ForeignKey(BatchJob, on_delete=models.CASCADE, related_name="tasks")
    chunk = models.ForeignKey(
        "corpora.Chunk", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    framework_version = models.ForeignKey(
        FrameworkVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    item_id = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="The input row of a kind other than 'framework'"
    )
    model_key = models.CharField(max_length=300)
    run = models.PositiveSmallIntegerField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    dispatch_token = models.CharField(max_length=32, blank=True)
    not_before = models.DateTimeField(null=True, blank=True, help_text="Retry after (backoff)")
    repairs = models.PositiveSmallIntegerField(default=0, help_text="Re-asks after invalid JSON")
    calls = models.PositiveSmallIntegerField(default=0, help_text="Gateway calls made")
    latency_ms = models.FloatField(null=True, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=14, decimal_places=8, default=0)
    raw_output = models.TextField(blank=True)
    parsed_output = models.JSONField(null=True, blank=True)
    validation_errors = models.JSONField(default=list, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    model_revision = models.CharField(max_length=200, blank=True)
    response_id = models.CharField(max_length=200, blank=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(
                fields=["job", "chunk", "framework_version", "model_key", "run"],
                name="batch_task_one_per_combination",
            ),
            models.UniqueConstraint(
                fields=["job", "item_id", "model_key", "run"],
                condition=models.Q(item_id__isnull=False),
                name="batch_task_one_per_item",
            ),
        ]
        indexes = [
            models.Index(fields=["job", "model_key", "status"], name="batch_task_dispatch"),
            models.Index(fields=["status", "heartbeat_at"], name="batch_task_stale"),
        ]

    def __str__(self) -> str:
        return self.id


class BatchStats(models.Model):
    """The latest statistics of a job (recomputed as tasks finish), with how many finished
    tasks they rest on."""

    job = models.OneToOneField(BatchJob, on_delete=models.CASCADE, related_name="stats")
    tasks_done = models.PositiveIntegerField(default=0)
    data = models.JSONField(default=dict)
    computed_at = models.DateTimeField(auto_now=True)
