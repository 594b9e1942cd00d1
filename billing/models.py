"""Prices, budgets, the spending ledger, alerts, approvals and overrides.

The ledger holds every dollar: GPU time of training jobs (one entry per job and day,
recomputed from the job's stored transition times, so it survives restarts and is never
counted twice) and, once the model gateway lands, LLM tokens (one entry per call or batch).
"""

from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.contrib.contenttypes.fields import GenericForeignKey
from django.contrib.contenttypes.models import ContentType
from django.db import models
from django.db.models import Q
from django.utils import timezone


class GpuPrice(models.Model):
    """The price catalog: what an hour of each GPU type costs, spot and on demand."""

    gpu_type = models.SlugField(max_length=64, unique=True, help_text="e.g. h100-pcie-80gb")
    display_name = models.CharField(max_length=120)
    spot_per_hour = models.DecimalField(max_digits=8, decimal_places=4)
    on_demand_per_hour = models.DecimalField(max_digits=8, decimal_places=4)
    source = models.CharField(max_length=200, help_text="Where the price comes from")
    updated_at = models.DateTimeField(default=timezone.now)
    is_active = models.BooleanField(default=True)
    notes = models.TextField(blank=True)

    class Meta:
        ordering = ["gpu_type"]
        constraints = [
            models.CheckConstraint(
                condition=Q(spot_per_hour__gte=0) & Q(on_demand_per_hour__gte=0),
                name="gpu_price_not_negative",
            )
        ]

    def __str__(self) -> str:
        return self.display_name

    def rate(self, *, spot: bool) -> Decimal:
        return self.spot_per_hour if spot else self.on_demand_per_hour


class MonthlyBudget(models.Model):
    """The budget of one calendar month (a month without a row inherits the latest one)."""

    month = models.DateField(unique=True, help_text="First day of the month")
    amount = models.DecimalField(max_digits=10, decimal_places=2)
    approval_threshold = models.DecimalField(
        max_digits=10, decimal_places=2, help_text="Jobs estimated over this need approval"
    )
    alert_thresholds = models.JSONField(
        default=list, help_text='[{"percent": 80, "channels": ["email"]}, ...]'
    )
    hard_cap_percent = models.PositiveSmallIntegerField(default=100)
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    updated_at = models.DateTimeField(auto_now=True)
    # The month's gateway spend (the SUM of its LlmCall costs) kept as a running total so a
    # call's budget reservation reads one locked row instead of summing a ledger that grows
    # with every call. Units of $0.00000001 (LlmCall.cost's 8 places) in an integer, so the
    # sum is exact on SQLite too. Changed only under this row's lock, in the transaction that
    # changes a call's cost (billing.services); NULL: not known, summed from the ledger at
    # the next reservation (a new row, or a ledger row written or deleted outside billing).
    llm_spent_e8 = models.BigIntegerField(null=True, blank=True, editable=False)

    # Every field but the counter: a plain save() (the budget page, the admin) must never
    # write back a counter it read before another process moved it.
    COUNTER_FIELDS = frozenset({"llm_spent_e8"})

    class Meta:
        ordering = ["-month"]
        constraints = [
            models.CheckConstraint(condition=Q(amount__gte=0), name="budget_not_negative")
        ]

    def __str__(self) -> str:
        return f"{self.month:%Y-%m}: ${self.amount}"

    def save(self, *args, **kwargs):
        if (
            not self._state.adding
            and self.pk is not None
            and kwargs.get("update_fields") is None
            and not kwargs.get("force_insert")
        ):
            kwargs["update_fields"] = [
                f.name
                for f in self._meta.concrete_fields
                if not f.primary_key and f.name not in self.COUNTER_FIELDS
            ]
        super().save(*args, **kwargs)


class JobCost(models.Model):
    """Billing state of one training job: its rate, estimate, reservation and live cost."""

    job = models.OneToOneField(
        "training.TrainingJob", on_delete=models.CASCADE, related_name="billing"
    )
    gpu_type = models.CharField(max_length=64)
    spot = models.BooleanField(default=False)
    rate_per_hour = models.DecimalField(max_digits=8, decimal_places=4, default=0)
    estimate = models.JSONField(default=dict, blank=True, help_text="The estimate at start")
    estimate_cost = models.DecimalField(max_digits=10, decimal_places=2, null=True, blank=True)
    reserved = models.DecimalField(max_digits=10, decimal_places=2, default=0)
    reserved_month = models.DateField(null=True, blank=True)
    accrued = models.DecimalField(max_digits=12, decimal_places=4, default=0)
    held_seconds = models.FloatField(default=0)
    accrued_at = models.DateTimeField(null=True, blank=True)
    projection = models.JSONField(
        default=dict, blank=True, help_text="Re-estimate from the measured speed"
    )
    variance_alerted_at = models.DateTimeField(null=True, blank=True)
    approved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    approved_at = models.DateTimeField(null=True, blank=True)
    override_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    override_reason = models.CharField(max_length=500, blank=True)
    overridden_at = models.DateTimeField(null=True, blank=True)
    capped_at = models.DateTimeField(null=True, blank=True, help_text="Stopped at the hard cap")
    finalized_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-job__created_at"]

    def __str__(self) -> str:
        return f"cost of {self.job_id}"

    @property
    def variance_pct(self) -> float | None:
        if not self.estimate_cost:
            return None
        return round(100 * (float(self.accrued) / float(self.estimate_cost) - 1), 1)


class LedgerEntry(models.Model):
    class Kind(models.TextChoices):
        GPU_TIME = "gpu_time", "GPU time"
        LLM_TOKENS = "llm_tokens", "LLM tokens"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    day = models.DateField(help_text="Day the spending happened (settings.TIME_ZONE)")
    month = models.DateField(db_index=True, help_text="First day of its month")
    amount = models.DecimalField(max_digits=12, decimal_places=6, help_text="Dollars")
    quantity = models.DecimalField(max_digits=18, decimal_places=4)
    unit = models.CharField(max_length=16, help_text="gpu_second, token...")
    rate = models.DecimalField(max_digits=14, decimal_places=10, help_text="Dollars per unit")
    content_type = models.ForeignKey(
        ContentType, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    object_id = models.CharField(max_length=64, blank=True, db_index=True)
    subject = GenericForeignKey("content_type", "object_id")
    attribution = models.CharField(max_length=120, blank=True, help_text="Client or project")
    description = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["day", "id"]
        verbose_name_plural = "ledger entries"
        indexes = [models.Index(fields=["month", "kind"])]
        constraints = [
            # GPU time: one entry per job and day, updated in place as the job runs.
            models.UniqueConstraint(
                fields=["kind", "content_type", "object_id", "day"],
                condition=Q(kind="gpu_time"),
                name="one_gpu_entry_per_job_day",
            )
        ]

    def __str__(self) -> str:
        return f"{self.day} {self.kind} ${self.amount:.2f}"


class BudgetAlert(models.Model):
    """A threshold alert, sent at most once per threshold and month."""

    month = models.DateField()
    threshold = models.PositiveSmallIntegerField(help_text="Percent of the budget")
    channels = models.JSONField(default=list)
    spent = models.DecimalField(max_digits=12, decimal_places=2)
    budget = models.DecimalField(max_digits=10, decimal_places=2)
    forecast = models.DecimalField(max_digits=12, decimal_places=2)
    active_jobs = models.JSONField(default=list)
    delivery = models.JSONField(default=dict, help_text="Outcome per channel")
    sent_at = models.DateTimeField(auto_now_add=True)
    # Null until every channel was tried: a process killed between creating the alert and
    # sending it leaves it pending, and the next budget check delivers what is left.
    delivered_at = models.DateTimeField(null=True, blank=True)
    # A delivery in progress holds the alert until then (one sender at a time).
    delivery_claimed_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-sent_at"]
        constraints = [
            models.UniqueConstraint(fields=["month", "threshold"], name="one_alert_per_threshold")
        ]

    def __str__(self) -> str:
        return f"{self.month:%Y-%m} {self.threshold}%"


class AuditEntry(models.Model):
    """Who did what to budgets and why: overrides, approvals, hard-cap stops, settings."""

    class Action(models.TextChoices):
        OVERRIDE = "override", "Budget override"
        APPROVAL = "approval", "Approval of an expensive job"
        HARD_CAP_STOP = "hard_cap_stop", "Stopped at the hard cap"
        BUDGET_SET = "budget_set", "Budget set"
        THRESHOLDS_SET = "thresholds_set", "Alert thresholds set"
        PRICES_REFRESHED = "prices_refreshed", "Prices refreshed"

    action = models.CharField(max_length=32, choices=Action.choices, db_index=True)
    job = models.ForeignKey(
        "training.TrainingJob",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="billing_audit",
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reason = models.CharField(max_length=500, blank=True)
    details = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "audit entries"

    def __str__(self) -> str:
        return f"{self.get_action_display()} ({self.created_at:%Y-%m-%d %H:%M})"


class NotificationPreference(models.Model):
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notification_preference"
    )
    job_completed_email = models.BooleanField(default=True)
    job_failed_email = models.BooleanField(default=True)
    job_slack = models.BooleanField(default=False, help_text="Also post my job events to Slack")

    def __str__(self) -> str:
        return f"notifications of {self.user_id}"


class NotificationLog(models.Model):
    """Every notification attempted, with its outcome."""

    kind = models.CharField(max_length=32, db_index=True)
    channel = models.CharField(max_length=16)
    recipients = models.TextField(blank=True)
    subject = models.CharField(max_length=300)
    ok = models.BooleanField()
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]


class LlmCall(models.Model):
    """One model-gateway call (cached and failed calls too): the LLM side of the ledger.

    Month spend = GPU ledger entries + the cost of these rows.
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    feature = models.CharField(
        max_length=32, db_index=True, help_text="judge, playground, batch..."
    )
    content_type = models.ForeignKey(
        ContentType, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    object_id = models.CharField(max_length=64, blank=True, db_index=True)
    subject = GenericForeignKey("content_type", "object_id")
    attribution = models.CharField(max_length=120, blank=True)
    provider = models.CharField(max_length=64)
    model = models.CharField(max_length=270, db_index=True, help_text="RegisteredModel key")
    operation = models.CharField(max_length=16, default="chat", help_text="chat or embeddings")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=14, decimal_places=8, default=0, help_text="Dollars")
    latency_ms = models.FloatField(default=0)
    attempts = models.PositiveSmallIntegerField(default=0)
    cached = models.BooleanField(default=False)
    outcome = models.CharField(
        max_length=64,
        default="ok",
        help_text='"ok", "error:<code>" or "in_flight" (written before the provider call)',
    )
    request_id = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    day = models.DateField()
    month = models.DateField(help_text="First day of its month")

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["month", "model"]),
            models.Index(fields=["month", "feature"]),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(cost__gte=0), name="llm_cost_not_negative")
        ]

    def __str__(self) -> str:
        return f"{self.model} {self.outcome} ${self.cost}"


class LlmReservation(models.Model):
    """The worst-case cost of an LLM call in flight, held against the month's budget until
    the call settles; a reservation past ``expires_at`` (a crashed process) no longer counts.

    A call about to reach a provider writes its ledger row first (``call``, outcome
    ``in_flight``) in the reservation's transaction: a process killed during the call leaves
    both behind, and recovery settles the row from them (the answer from the response cache
    when it got there, else the held worst case), so every call that reached a provider is in
    the ledger exactly once."""

    month = models.DateField(db_index=True)
    amount = models.DecimalField(max_digits=14, decimal_places=8)
    model = models.CharField(max_length=270)
    feature = models.CharField(max_length=32, blank=True)
    request_id = models.CharField(max_length=64, blank=True)
    call = models.OneToOneField(
        LlmCall,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="reservation",
        help_text="The call's write-ahead ledger row (outcome in_flight until it settles)",
    )
    cache_key = models.CharField(
        max_length=64, blank=True, help_text="The call's response-cache key (for recovery)"
    )
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["created_at"]

    def __str__(self) -> str:
        return f"{self.model} ${self.amount} (until {self.expires_at:%H:%M:%S})"
