"""Validation of a trained adapter: runs, generated responses, scores, reports, approvals."""

from __future__ import annotations

import secrets
import uuid
from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone

from config.longtasks import LongTaskFields


class RunStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


class Side(models.TextChoices):
    BASELINE = "baseline", "Base model"
    TRAINED = "trained", "Trained adapter"


class Suite(models.TextChoices):
    EMOTIONAL_INTELLIGENCE = "emotional_intelligence", "Emotional intelligence"
    BRAND_VOICE = "brand_voice", "Brand voice"


class ValidationRunQuerySet(models.QuerySet):
    def for_list(self):
        return self.select_related("job", "job__base_model", "created_by")

    def active(self):
        return self.filter(status__in=(RunStatus.PENDING, RunStatus.RUNNING))


STAGE_LABELS = {
    "preparing": "Preparing",
    "loading_models": "Loading the models",
    "perplexity": "Perplexity",
    "retention": "Knowledge retention",
    "generating": "Generating responses",
    "judging": "Judging responses",
    "aggregating": "Computing the figures",
    "report": "Writing the report",
    "completed": "Completed",
}


class ValidationRun(LongTaskFields):
    class Trigger(models.TextChoices):
        AUTO = "auto", "Automatic (job completed)"
        MANUAL = "manual", "Started by hand"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    job = models.ForeignKey(
        "training.TrainingJob", on_delete=models.CASCADE, related_name="validation_runs"
    )
    status = models.CharField(
        max_length=16, choices=RunStatus.choices, default=RunStatus.PENDING, db_index=True
    )
    progress = models.FloatField(default=0.0, help_text="Percent done")
    stage = models.CharField(max_length=64, blank=True)
    stage_detail = models.CharField(
        max_length=200,
        blank=True,
        help_text='Where in the stage, e.g. "Retention: 37/100 questions"',
    )
    trigger = models.CharField(max_length=8, choices=Trigger.choices, default=Trigger.MANUAL)

    # What was measured with what: kept with the run so old reports keep their versions.
    evaluator_version = models.CharField(max_length=32, blank=True)
    suites = models.JSONField(default=dict, blank=True, help_text="{name: {version, sha256}}")
    base_model = models.CharField(max_length=300, blank=True)
    adapter_uri = models.CharField(max_length=500, blank=True)
    decoding = models.JSONField(default=dict, blank=True)
    seeds = models.JSONField(default=dict, blank=True)

    metrics = models.JSONField(default=dict, blank=True, help_text="One entry per part")
    examples = models.JSONField(default=list, blank=True)
    error_type = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)

    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    cancelled_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    objects = ValidationRunQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"Validation of {self.job} ({self.get_status_display()})"

    @property
    def is_active(self) -> bool:
        return self.status in (RunStatus.PENDING, RunStatus.RUNNING)

    def get_stage_label(self) -> str:
        return STAGE_LABELS.get(self.stage, self.stage.replace("_", " ").capitalize())

    @property
    def duration_seconds(self) -> float | None:
        if not self.started_at:
            return None
        end = self.completed_at or timezone.now()
        return (end - self.started_at).total_seconds()


class GeneratedResponse(models.Model):
    run = models.ForeignKey(ValidationRun, on_delete=models.CASCADE, related_name="responses")
    suite = models.CharField(max_length=32, choices=Suite.choices)
    item_id = models.CharField(max_length=64)
    category = models.CharField(max_length=64, blank=True)
    side = models.CharField(max_length=16, choices=Side.choices)
    prompt = models.TextField()
    text = models.TextField()
    stopped = models.BooleanField(help_text="Ended by itself before the token limit")
    new_tokens = models.PositiveIntegerField(default=0)
    seconds = models.FloatField(default=0.0)

    class Meta:
        ordering = ["suite", "item_id", "side"]
        constraints = [
            models.UniqueConstraint(
                fields=["run", "suite", "item_id", "side"], name="one_response_per_side"
            )
        ]


class JudgeScore(models.Model):
    """Rubric scores an LLM judge gave one response (offline model or an endpoint)."""

    response = models.ForeignKey(
        GeneratedResponse, on_delete=models.CASCADE, related_name="judge_scores"
    )
    judge = models.CharField(max_length=200, help_text="The judging model")
    scores = models.JSONField(help_text="{dimension: 1-5}")
    raw = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["response", "judge"], name="one_score_per_judge")
        ]


class RatingPair(models.Model):
    """One item shown to one rater, with the blind left/right assignment (server side only)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    run = models.ForeignKey(ValidationRun, on_delete=models.CASCADE, related_name="rating_pairs")
    rater = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    suite = models.CharField(max_length=32, choices=Suite.choices)
    item_id = models.CharField(max_length=64)
    left_side = models.CharField(max_length=16, choices=Side.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["run", "rater", "suite", "item_id"], name="one_pair_per_rater_item"
            )
        ]

    @property
    def right_side(self) -> str:
        return Side.TRAINED if self.left_side == Side.BASELINE else Side.BASELINE


class HumanRating(models.Model):
    pair = models.OneToOneField(RatingPair, on_delete=models.CASCADE, related_name="rating")
    rater = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    run = models.ForeignKey(ValidationRun, on_delete=models.CASCADE, related_name="ratings")
    suite = models.CharField(max_length=32, choices=Suite.choices)
    item_id = models.CharField(max_length=64)
    # As the rater saw them, and mapped back to the sides on the server.
    left_scores = models.JSONField()
    right_scores = models.JSONField()
    baseline_scores = models.JSONField()
    trained_scores = models.JSONField()
    comment = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]


class Report(models.Model):
    run = models.ForeignKey(ValidationRun, on_delete=models.CASCADE, related_name="reports")
    version = models.PositiveIntegerField()
    storage_path = models.CharField(max_length=500)
    sha256 = models.CharField(max_length=64)
    size_bytes = models.BigIntegerField(default=0)
    metrics = models.JSONField(default=dict, blank=True, help_text="The figures it shows")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    download_count = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-version"]
        constraints = [
            models.UniqueConstraint(fields=["run", "version"], name="one_report_per_version")
        ]

    @property
    def filename(self) -> str:
        return f"validation-report-{str(self.run_id)[:8]}-v{self.version}.pdf"


def _share_token() -> str:
    return secrets.token_urlsafe(32)


SHARE_LINK_DAYS = 30


def _share_expiry():
    return timezone.now() + timedelta(days=SHARE_LINK_DAYS)


class ShareLinkQuerySet(models.QuerySet):
    def usable(self, now=None):
        now = now or timezone.now()
        return self.filter(revoked_at__isnull=True, expires_at__gt=now)


class ShareLink(models.Model):
    report = models.ForeignKey(Report, on_delete=models.CASCADE, related_name="share_links")
    token = models.CharField(max_length=64, unique=True, default=_share_token, editable=False)
    expires_at = models.DateTimeField(default=_share_expiry)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    download_count = models.PositiveIntegerField(default=0)
    last_used_at = models.DateTimeField(null=True, blank=True)

    objects = ShareLinkQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    @property
    def state(self) -> str:
        if self.revoked_at:
            return "revoked"
        return "active" if self.expires_at > timezone.now() else "expired"


class Approval(models.Model):
    """An analyst's decision on a model, with the reason. Kept for audit; the latest wins."""

    class Decision(models.TextChoices):
        APPROVED = "approved", "Approved"
        REJECTED = "rejected", "Rejected"

    run = models.ForeignKey(ValidationRun, on_delete=models.CASCADE, related_name="approvals")
    job = models.ForeignKey(
        "training.TrainingJob", on_delete=models.CASCADE, related_name="approvals"
    )
    decision = models.CharField(max_length=16, choices=Decision.choices)
    reason = models.TextField()
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-decided_at", "-id"]


# --- Evaluation datasets, single evaluations and batch evaluations (issue 17) -----------------


class EvalDataset(models.Model):
    """A versioned evaluation dataset (JSONL of input, reference, contexts, metadata); each
    upload under a name is a new version; the file's sha256 is kept."""

    name = models.SlugField(max_length=100)
    version = models.PositiveIntegerField()
    description = models.TextField(blank=True)
    sha256 = models.CharField(max_length=64)
    size_bytes = models.PositiveBigIntegerField(default=0)
    sample_count = models.PositiveIntegerField(default=0)
    schema_version = models.CharField(max_length=8, default="1")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name", "-version"]
        constraints = [
            models.UniqueConstraint(fields=["name", "version"], name="eval_dataset_version")
        ]

    def __str__(self) -> str:
        return f"{self.name}@v{self.version}"

    @property
    def label(self) -> str:
        return f"{self.name}@v{self.version}"


class EvalSample(models.Model):
    dataset = models.ForeignKey(EvalDataset, on_delete=models.CASCADE, related_name="samples")
    index = models.PositiveIntegerField(help_text="0-based position in the file")
    line = models.PositiveIntegerField(help_text="1-based line in the uploaded file")
    input = models.TextField()
    reference = models.TextField(blank=True)
    contexts = models.JSONField(default=list, blank=True)
    metadata = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["dataset", "index"]
        constraints = [
            models.UniqueConstraint(fields=["dataset", "index"], name="eval_sample_index")
        ]


class BatchEval(models.Model):
    """A batch evaluation: every (sample x model x run) of a dataset scored with one rubric.
    It runs as a batch job of kind 'eval' (``job``: the engine's tasks, dispatch, retries and
    recovery); its items are the scored results, one per task."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        COMPLETED = "completed", "Completed"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    ACTIVE = (Status.QUEUED, Status.RUNNING)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200, blank=True)
    dataset = models.ForeignKey(EvalDataset, on_delete=models.PROTECT, related_name="batches")
    job = models.OneToOneField(
        "jobs.BatchJob",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="batch_eval",
        help_text="The batch job that runs it",
    )
    rubric = models.CharField(max_length=100)
    rubric_version = models.CharField(max_length=32)
    rubric_sha256 = models.CharField(max_length=64)
    models_list = models.JSONField(default=list)
    runs = models.PositiveSmallIntegerField(default=1)
    frozen = models.JSONField(default=dict, help_text="Decoding, judge, code version, environment")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    item_count = models.PositiveIntegerField(default=0)
    aggregates = models.JSONField(default=dict, blank=True)
    error_message = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE


class EvalRun(models.Model):
    """One scored sample: a single evaluation (``batch`` empty) or an item of a batch
    evaluation. Keeps what was scored, the scores per dimension, the failure class, the
    judge's prompt/model/version and the run metadata (model parameters, rubric version and
    hash, environment, timestamps)."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    class Failure(models.TextChoices):
        NONE = "", "None"
        JUDGE_REFUSAL = "judge_refusal", "Judge refusal"
        INVALID_OUTPUT = "invalid_output", "Invalid output"
        TIMEOUT = "timeout", "Timeout"
        PROVIDER_ERROR = "provider_error", "Provider error"
        BELOW_THRESHOLD = "below_threshold", "Below threshold"
        PLATFORM_ERROR = "platform_error", "Platform error"  # worker lost, crash

    OPEN = (Status.PENDING, Status.QUEUED, Status.RUNNING)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    batch = models.ForeignKey(
        BatchEval, null=True, blank=True, on_delete=models.CASCADE, related_name="items"
    )
    task = models.OneToOneField(
        "jobs.BatchTask",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="eval_result",
        help_text="The batch task this item is the result of (one result per task)",
    )
    dataset = models.ForeignKey(
        EvalDataset, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    sample = models.ForeignKey(
        EvalSample, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    sample_index = models.PositiveIntegerField(null=True, blank=True)
    model_key = models.CharField(max_length=300, blank=True)
    run = models.PositiveSmallIntegerField(default=1)
    rubric = models.CharField(max_length=100)
    rubric_version = models.CharField(max_length=32)
    rubric_sha256 = models.CharField(max_length=64)
    input = models.TextField()
    reference = models.TextField(blank=True)
    contexts = models.JSONField(default=list, blank=True)
    output = models.TextField(blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    scores = models.JSONField(default=dict, blank=True)
    passed = models.BooleanField(null=True)
    failure = models.CharField(max_length=20, choices=Failure.choices, blank=True, default="")
    error_message = models.TextField(blank=True)
    judge = models.JSONField(default=dict, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    latency_ms = models.FloatField(null=True, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=14, decimal_places=8, default=0)
    attempts = models.PositiveSmallIntegerField(default=0)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["batch", "status"], name="eval_run_batch_status"),
            models.Index(fields=["batch", "failure"], name="eval_run_batch_failure"),
        ]
