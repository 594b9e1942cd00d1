"""Training jobs and everything they produce (after the seed's schema)."""

import secrets
import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q


class BaseModel(models.Model):
    """A base model the platform can fine-tune (the registry)."""

    class Source(models.TextChoices):
        OFFLINE = "offline", "Bundled offline model"
        LOCAL = "local", "Local folder"
        HUB = "hub", "Hugging Face Hub"

    name = models.CharField(max_length=200, unique=True)
    display_name = models.CharField(max_length=200)
    source = models.CharField(max_length=16, choices=Source.choices)
    path = models.CharField(max_length=500, blank=True, help_text="Hub repo id or local folder")
    revision = models.CharField(max_length=100, blank=True)
    parameters = models.BigIntegerField(help_text="Parameter count")
    size_bytes = models.BigIntegerField(default=0, help_text="Download size of the weights")
    context_length = models.PositiveIntegerField()
    licence = models.CharField(max_length=100)
    gated = models.BooleanField(default=False, help_text="Needs an accepted licence and HF token")
    is_active = models.BooleanField(default=True)
    notes = models.TextField(blank=True)

    class Meta:
        ordering = ["parameters"]

    def __str__(self) -> str:
        return self.display_name


class Preset(models.Model):
    """A named hyperparameter set with the explanation users choose by."""

    key = models.SlugField(max_length=32, unique=True)
    name = models.CharField(max_length=64)
    summary = models.CharField(max_length=200)
    explanation = models.TextField()
    best_for = models.CharField(max_length=300)
    hyperparameters = models.JSONField()
    is_default = models.BooleanField(default=False)
    position = models.PositiveSmallIntegerField(default=0)

    class Meta:
        ordering = ["position"]
        constraints = [
            models.UniqueConstraint(
                fields=["is_default"], condition=Q(is_default=True), name="one_default_preset"
            )
        ]

    def __str__(self) -> str:
        return self.name


class JobStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    QUEUED = "queued", "Queued"
    PROVISIONING = "provisioning", "Provisioning"
    PREPROCESSING = "preprocessing", "Preprocessing"
    MODEL_LOADING = "model_loading", "Loading model"
    TRAINING = "training", "Training"
    RECOVERING = "recovering", "Recovering"
    FINALIZATION = "finalization", "Finalizing"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


TERMINAL_STATUSES = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)
RUNNING_STATUSES = (
    JobStatus.PROVISIONING,
    JobStatus.PREPROCESSING,
    JobStatus.MODEL_LOADING,
    JobStatus.TRAINING,
    JobStatus.RECOVERING,
    JobStatus.FINALIZATION,
)
ACTIVE_STATUSES = (JobStatus.QUEUED, *RUNNING_STATUSES)


class TrainingJobQuerySet(models.QuerySet):
    def active(self):
        return self.filter(status__in=ACTIVE_STATUSES)

    def running(self):
        return self.filter(status__in=RUNNING_STATUSES)

    def for_list(self):
        return self.select_related("created_by", "preset", "base_model", "training_file")


class TrainingJob(models.Model):
    class Executor(models.TextChoices):
        LOCAL = "local", "Local (this machine)"
        RUNPOD = "runpod", "RunPod"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=255)
    description = models.TextField(blank=True)
    notes = models.TextField(blank=True)
    tags = models.JSONField(default=list, blank=True)

    training_file = models.ForeignKey(
        "corpora.TrainingFile", on_delete=models.PROTECT, related_name="training_jobs"
    )
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="jobs")
    preset = models.ForeignKey(Preset, null=True, blank=True, on_delete=models.SET_NULL)
    configuration = models.JSONField(help_text="Resolved hyperparameters and run settings")

    status = models.CharField(
        max_length=20, choices=JobStatus.choices, default=JobStatus.PENDING, db_index=True
    )
    progress = models.FloatField(default=0.0, help_text="Percent of planned steps")
    current_step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(null=True, blank=True)
    current_epoch = models.FloatField(null=True, blank=True)
    latest_metrics = models.JSONField(default=dict, blank=True)
    eta_seconds = models.FloatField(null=True, blank=True)

    executor = models.CharField(max_length=16, choices=Executor.choices, default=Executor.LOCAL)
    executor_ref = models.CharField(max_length=200, blank=True, help_text="pid or pod id")
    gpu_type = models.CharField(max_length=64, blank=True)
    spot = models.BooleanField(default=False)
    attempt = models.PositiveIntegerField(default=0, help_text="Launches so far")
    webhook_secret = models.CharField(max_length=64, default=secrets.token_hex, editable=False)

    error_type = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    error_details = models.JSONField(default=dict, blank=True)
    retry_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="retries"
    )
    retry_changes = models.JSONField(default=list, blank=True)
    recovery_count = models.PositiveIntegerField(default=0)
    resume_check = models.JSONField(default=dict, blank=True)
    dataset_report = models.JSONField(default=dict, blank=True)
    warnings = models.JSONField(default=list, blank=True)

    perplexity_baseline = models.FloatField(null=True, blank=True)
    perplexity_trained = models.FloatField(null=True, blank=True)
    final_train_loss = models.FloatField(null=True, blank=True)
    final_val_loss = models.FloatField(null=True, blank=True)
    output_uri = models.CharField(max_length=500, blank=True)

    cost_estimate = models.DecimalField(max_digits=10, decimal_places=2, null=True, blank=True)
    cost_actual = models.DecimalField(max_digits=10, decimal_places=4, default=0)

    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    last_event_at = models.DateTimeField(null=True, blank=True)
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    # A launch the provider refused (no capacity, API unreachable) is retried with backoff.
    launch_waiting_since = models.DateTimeField(null=True, blank=True)
    launch_retry_at = models.DateTimeField(null=True, blank=True, db_index=True)
    launch_tries = models.PositiveIntegerField(default=0)

    objects = TrainingJobQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "created_at"])]

    def __str__(self) -> str:
        return self.name

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    @property
    def perplexity_improvement_pct(self) -> float | None:
        if not self.perplexity_baseline or self.perplexity_trained is None:
            return None
        return round(100 * (1 - self.perplexity_trained / self.perplexity_baseline), 2)

    @property
    def spot_for_next_launch(self) -> bool:
        """Spot again after a preemption, until RUNPOD_ON_DEMAND_AFTER_PREEMPTIONS of them."""
        limit = settings.RUNPOD_ON_DEMAND_AFTER_PREEMPTIONS
        return self.spot and (limit <= 0 or self.recovery_count < limit)

    @property
    def waiting_for_capacity(self) -> bool:
        return self.status == JobStatus.PROVISIONING and self.launch_retry_at is not None

    @property
    def recovery_summary(self) -> str:
        if not self.recovery_count:
            return ""
        outcome = "resumed successfully" if self.status != JobStatus.FAILED else "then failed"
        return f"Interrupted {self.recovery_count}x, {outcome}"


class JobTransition(models.Model):
    """Every status change, with when and why (stage durations come from here)."""

    job = models.ForeignKey(TrainingJob, on_delete=models.CASCADE, related_name="transitions")
    from_status = models.CharField(max_length=20, choices=JobStatus.choices)
    to_status = models.CharField(max_length=20, choices=JobStatus.choices)
    reason = models.CharField(max_length=300, blank=True)
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["at", "id"]


class MetricPoint(models.Model):
    # What a worker's `metrics` event may carry besides the step (gpu/PROTOCOL.md).
    VALUE_FIELDS = (
        "epoch",
        "train_loss",
        "val_loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
        "gpu_memory_mb",
        "elapsed_seconds",
        "eta_seconds",
    )

    job = models.ForeignKey(TrainingJob, on_delete=models.CASCADE, related_name="metrics")
    step = models.PositiveIntegerField()
    epoch = models.FloatField(null=True)
    train_loss = models.FloatField(null=True)
    val_loss = models.FloatField(null=True)
    learning_rate = models.FloatField(null=True)
    grad_norm = models.FloatField(null=True)
    tokens_per_second = models.FloatField(null=True)
    gpu_memory_mb = models.FloatField(null=True)
    elapsed_seconds = models.FloatField(null=True)
    eta_seconds = models.FloatField(null=True)
    recorded_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["step"]
        constraints = [models.UniqueConstraint(fields=["job", "step"], name="one_point_per_step")]


class WebhookEvent(models.Model):
    """Every event the worker sent, stored raw before it is processed (once)."""

    event_id = models.UUIDField(unique=True)
    job = models.ForeignKey(TrainingJob, on_delete=models.CASCADE, related_name="events")
    type = models.CharField(max_length=32, db_index=True)
    sequence = models.PositiveIntegerField(null=True)
    payload = models.JSONField()
    received_at = models.DateTimeField(auto_now_add=True)
    processed = models.BooleanField(default=False)
    processed_at = models.DateTimeField(null=True, blank=True)
    processing_error = models.TextField(blank=True)

    class Meta:
        ordering = ["received_at", "id"]


class Checkpoint(models.Model):
    job = models.ForeignKey(TrainingJob, on_delete=models.CASCADE, related_name="checkpoints")
    step = models.PositiveIntegerField()
    uri = models.CharField(max_length=500)
    manifest_uri = models.CharField(max_length=500)
    size_bytes = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["step"]
        constraints = [
            models.UniqueConstraint(fields=["job", "step"], name="one_checkpoint_per_step")
        ]


class Recovery(models.Model):
    """One automatic recovery after an interruption; the relaunch delay is measured."""

    job = models.ForeignKey(TrainingJob, on_delete=models.CASCADE, related_name="recoveries")
    reason = models.CharField(max_length=300)
    detected_at = models.DateTimeField()
    relaunched_at = models.DateTimeField(null=True, blank=True)
    from_step = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["detected_at"]

    @property
    def relaunch_seconds(self) -> float | None:
        if self.relaunched_at is None:
            return None
        return (self.relaunched_at - self.detected_at).total_seconds()


class TrainingPod(models.Model):
    """One provider instance (a RunPod pod) per launch, kept until it is terminated:
    a stopped pod still bills for its storage, so every pod here must end terminated."""

    class State(models.TextChoices):
        STARTING = "starting", "Starting"
        RUNNING = "running", "Running"
        EXITED = "exited", "Exited"
        GONE = "gone", "Gone"
        TERMINATED = "terminated", "Terminated"

    job = models.ForeignKey(TrainingJob, on_delete=models.CASCADE, related_name="pods")
    attempt = models.PositiveIntegerField()
    pod_id = models.CharField(max_length=100, unique=True)
    name = models.CharField(max_length=200)
    gpu_type = models.CharField(max_length=100, help_text="The provider's GPU type id")
    gpu_count = models.PositiveSmallIntegerField(default=1)
    cloud_type = models.CharField(max_length=16, blank=True)
    spot = models.BooleanField(default=False)
    bid_per_gpu = models.DecimalField(max_digits=8, decimal_places=4, null=True, blank=True)
    cost_per_hour = models.DecimalField(max_digits=8, decimal_places=4, null=True, blank=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.STARTING)
    detail = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_checked_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True, help_text="Seen exited or gone")
    terminated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["terminated_at"])]

    def __str__(self) -> str:
        return self.pod_id


class Artifact(models.Model):
    class Kind(models.TextChoices):
        ADAPTER = "adapter", "Adapter folder"
        ADAPTER_ZIP = "adapter_zip", "Adapter ZIP"
        METRICS_JSON = "metrics_json", "Metrics (JSON)"
        METRICS_CSV = "metrics_csv", "Metrics (CSV)"
        CONFIG = "config", "Resolved configuration"
        DEPLOYMENT_PACKAGE = "deployment_package", "Deployment package"
        WORKER_LOG = "worker_log", "Worker log"

    job = models.ForeignKey(TrainingJob, on_delete=models.CASCADE, related_name="artifacts")
    kind = models.CharField(max_length=32, choices=Kind.choices)
    storage_path = models.CharField(max_length=500)
    size_bytes = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    download_count = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["kind"]
        constraints = [
            models.UniqueConstraint(fields=["job", "kind"], name="one_artifact_per_kind")
        ]


class ArtifactDownload(models.Model):
    artifact = models.ForeignKey(Artifact, on_delete=models.CASCADE, related_name="downloads")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    at = models.DateTimeField(auto_now_add=True)
    ip_address = models.GenericIPAddressField(null=True)
    request_id = models.CharField(max_length=128, blank=True)


class JobTemplate(models.Model):
    """A saved configuration anyone on the team can start a job from."""

    name = models.CharField(max_length=200, unique=True)
    description = models.TextField(blank=True)
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT)
    preset = models.ForeignKey(Preset, null=True, blank=True, on_delete=models.SET_NULL)
    overrides = models.JSONField(default=dict, blank=True)
    executor = models.CharField(max_length=16, default=TrainingJob.Executor.LOCAL)
    gpu_type = models.CharField(max_length=64, blank=True)
    spot = models.BooleanField(default=False)
    training_file = models.ForeignKey(
        "corpora.TrainingFile",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="Start on this file; when empty the user picks one (newest ready preselected)",
    )
    notes = models.TextField(blank=True)
    tags = models.JSONField(default=list, blank=True)
    source_job = models.ForeignKey(
        TrainingJob, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    use_count = models.PositiveIntegerField(default=0, help_text="Jobs started from it")
    last_used_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class PlaygroundRun(models.Model):
    """One prompt answered by the base model and by a job's adapter, side by side."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Generating"
        COMPLETED = "completed", "Completed"
        FAILED = "failed", "Failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    job = models.ForeignKey(TrainingJob, on_delete=models.CASCADE, related_name="playground_runs")
    system_prompt = models.TextField(blank=True)
    prompt = models.TextField()
    decoding = models.JSONField(default=dict, help_text="Decoding settings used")
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True
    )
    stage = models.CharField(max_length=100, blank=True, help_text="What it is doing now")
    base_output = models.TextField(blank=True)
    adapter_output = models.TextField(blank=True)
    timings = models.JSONField(default=dict, blank=True, help_text="Seconds per phase")
    token_counts = models.JSONField(default=dict, blank=True)
    device = models.CharField(max_length=16, blank=True)
    error_message = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    @property
    def is_finished(self) -> bool:
        return self.status in (self.Status.COMPLETED, self.Status.FAILED)
