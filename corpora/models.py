import uuid

from django.conf import settings
from django.db import models


class TrainingFileQuerySet(models.QuerySet):
    def ready(self):
        return self.filter(status=TrainingFile.Status.READY)

    def with_uploader(self):
        return self.select_related("uploaded_by")


class TrainingFile(models.Model):
    """A validated training file (JSONL of conversations, ``schemas/training_file``).

    Only files that pass the schema are stored. ``status`` then says whether every
    conversation is also trainable (ends on an assistant turn, unique ids...); problems
    are listed in ``validation_errors`` and block starting a job with the file.
    """

    class Status(models.TextChoices):
        READY = "ready", "Ready to train"
        PROBLEMS = "problems", "Has problems"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    schema_version = models.CharField(max_length=16, default="1")
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
