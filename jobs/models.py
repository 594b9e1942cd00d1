"""The model gateway's registry: providers (with their encrypted API keys), the models they
serve, and the gateway's settings. The ledger of calls lives in billing (LlmCall)."""

from __future__ import annotations

import contextlib
import os
import re
from typing import ClassVar

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class Provider(models.Model):
    """An LLM endpoint: any OpenAI-compatible API, or the offline model on this machine."""

    class Kind(models.TextChoices):
        OPENAI = "openai", "OpenAI-compatible endpoint"
        OFFLINE = "offline", "Offline model (this machine)"

    slug = models.SlugField(max_length=64, unique=True, help_text='e.g. "hf-router", "openai"')
    name = models.CharField(max_length=120)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.OPENAI)
    base_url = models.URLField(max_length=300, blank=True, help_text="Blank for the offline kind")
    api_key_encrypted = models.TextField(blank=True, help_text="Fernet token; never shown back")
    api_key_last4 = models.CharField(max_length=4, blank=True)
    enabled = models.BooleanField(default=True)
    requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Blank: unlimited"
    )
    tokens_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Blank: unlimited"
    )
    timeout_s = models.FloatField(null=True, blank=True, help_text="Blank: the gateway default")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.name or self.slug

    @property
    def env_key_name(self) -> str:
        return "GATEWAY_" + re.sub(r"[^A-Z0-9]", "_", self.slug.upper()) + "_API_KEY"

    def set_api_key(self, raw: str) -> None:
        """Store ``raw`` encrypted (blank clears it); the caller saves."""
        from jobs.gateway.secrets import encrypt

        raw = (raw or "").strip()
        self.api_key_encrypted = encrypt(raw) if raw else ""
        self.api_key_last4 = raw[-4:] if raw else ""

    def api_key(self) -> str:
        """The key to send: the environment wins (GATEWAY_<SLUG>_API_KEY; HF_TOKEN for the
        Hugging Face router), else the stored one decrypted."""
        from_env = os.environ.get(self.env_key_name, "")
        if not from_env and self.slug == "hf-router":
            from_env = os.environ.get("HF_TOKEN", "") or getattr(settings, "HF_TOKEN", "")
        if from_env:
            return from_env
        if not self.api_key_encrypted:
            return ""
        from jobs.gateway.secrets import decrypt

        return decrypt(self.api_key_encrypted)

    @property
    def has_api_key(self) -> bool:
        return bool(self.api_key_encrypted) or bool(os.environ.get(self.env_key_name))


class RegisteredModelQuerySet(models.QuerySet):
    def enabled(self):
        return self.filter(enabled=True, provider__enabled=True)

    def with_capability(self, capability: str):
        # JSON "contains" on a list is not supported by SQLite; the capability names are
        # distinct words, so a text match on the JSON is exact enough and portable.
        return self.filter(capabilities__icontains=f'"{capability}"')


class RegisteredModel(models.Model):
    """A model a provider serves, with its prices (per million tokens)."""

    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="models")
    remote_id = models.CharField(max_length=200, help_text="The provider's model id")
    key = models.CharField(max_length=270, unique=True, help_text='"<provider slug>/<remote id>"')
    display_name = models.CharField(max_length=200, blank=True)
    context_length = models.PositiveIntegerField(null=True, blank=True)
    price_input_per_m = models.DecimalField(
        max_digits=12, decimal_places=6, null=True, blank=True, help_text="$ per 1M input tokens"
    )
    price_output_per_m = models.DecimalField(
        max_digits=12, decimal_places=6, null=True, blank=True, help_text="$ per 1M output tokens"
    )
    price_source = models.CharField(
        max_length=120, blank=True, help_text='"table:<package>", "admin" or "local"'
    )
    capabilities = models.JSONField(default=list, help_text='["chat"], ["embeddings"]')
    parent = models.CharField(max_length=270, blank=True, help_text="Base model key, for adapters")
    revision = models.CharField(
        max_length=128, blank=True, help_text="Adapter checksum; part of the cache key"
    )
    adapter_uri = models.CharField(
        max_length=500, blank=True, help_text="Storage path of a LoRA adapter served offline"
    )
    enabled = models.BooleanField(default=True)
    allow_unpriced = models.BooleanField(
        default=False, help_text="An admin's explicit choice to allow a model without a price"
    )
    requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Blank: the provider's"
    )
    tokens_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Blank: the provider's"
    )
    last_seen_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = RegisteredModelQuerySet.as_manager()

    class Meta:
        ordering = ["key"]
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "remote_id"], name="one_model_per_remote_id"
            ),
            models.CheckConstraint(
                condition=(Q(price_input_per_m__gte=0) | Q(price_input_per_m__isnull=True))
                & (Q(price_output_per_m__gte=0) | Q(price_output_per_m__isnull=True)),
                name="model_price_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return self.key

    def save(self, *args, **kwargs):
        if not self.key and self.provider_id:
            self.key = f"{self.provider.slug}/{self.remote_id}"
        super().save(*args, **kwargs)

    @property
    def is_priced(self) -> bool:
        return self.price_input_per_m is not None and self.price_output_per_m is not None

    def has_capability(self, capability: str) -> bool:
        return capability in (self.capabilities or [])


class GatewaySettings(models.Model):
    """The gateway's tunables, edited on the settings page; environment variables win."""

    default_runs = models.PositiveSmallIntegerField(default=5)
    retry_attempts = models.PositiveSmallIntegerField(default=4)
    backoff_base_s = models.FloatField(default=0.5)
    backoff_cap_s = models.FloatField(default=20.0)
    timeout_s = models.FloatField(default=60.0, help_text="Per request")
    deadline_s = models.FloatField(default=300.0, help_text="Overall, retries included")
    cache_ttl_s = models.PositiveIntegerField(default=86400)
    breaker_failure_threshold = models.PositiveSmallIntegerField(default=5)
    breaker_reset_s = models.FloatField(default=30.0)
    updated_at = models.DateTimeField(default=timezone.now)

    FIELDS = (
        "default_runs",
        "retry_attempts",
        "backoff_base_s",
        "backoff_cap_s",
        "timeout_s",
        "deadline_s",
        "cache_ttl_s",
        "breaker_failure_threshold",
        "breaker_reset_s",
    )

    class Meta:
        verbose_name = "gateway settings"
        verbose_name_plural = "gateway settings"

    def __str__(self) -> str:
        return "Gateway settings"

    version: ClassVar[int] = 0  # bumped on save: this process drops its cached copy

    def save(self, *args, **kwargs):
        self.pk = 1
        self.updated_at = timezone.now()
        super().save(*args, **kwargs)
        GatewaySettings.version += 1

    @classmethod
    def load(cls) -> GatewaySettings:
        obj, _ = cls.objects.get_or_create(pk=1)
        return obj

    def effective(self) -> dict:
        """Each setting with the environment's value winning (GATEWAY_RETRY_ATTEMPTS, ...)."""
        out = {}
        for name in self.FIELDS:
            value = getattr(self, name)
            raw = os.environ.get(f"GATEWAY_{name.upper()}")
            if raw not in (None, ""):
                with contextlib.suppress(ValueError):
                    value = type(value)(float(raw)) if isinstance(value, int) else float(raw)
            out[name] = value
        return out

    def overridden_by_env(self) -> list[str]:
        return [n for n in self.FIELDS if os.environ.get(f"GATEWAY_{n.upper()}") not in (None, "")]


class RateLimitWindow(models.Model):
    """One shared rate-limit counter of the gateway's database storage for ``limits`` (used
    where there is no Redis): the moving window's entries, or a fixed window's count."""

    key = models.CharField(max_length=255, unique=True)
    entries = models.JSONField(default=list, help_text="[[timestamp, weight], ...]")
    count = models.PositiveIntegerField(default=0)
    expires_at = models.FloatField(default=0, help_text="Unix time the fixed window ends")

    def __str__(self) -> str:
        return self.key


# --- Serving: response profiles, chat responses and their feedback (issue 15) -------------------


class ResponseProfile(models.Model):
    """A named, versioned generation profile: the seed's "LP/LS" controls read as length
    preference (target and maximum answer length) and language style (register and a
    persona/system prompt), on top of decoding settings. Defined in files under version
    control (jobs/profiles/<name>.v<version>.yaml), validated, and mirrored here so every
    response can point at the exact version it used."""

    class Register(models.TextChoices):
        NEUTRAL = "neutral", "Neutral"
        FORMAL = "formal", "Formal"
        CASUAL = "casual", "Casual"
        TECHNICAL = "technical", "Technical"

    name = models.SlugField(max_length=64)
    version = models.PositiveIntegerField()
    title = models.CharField(max_length=120)
    description = models.TextField(blank=True)
    target_words = models.PositiveIntegerField(help_text="Length preference: aimed-for words")
    max_tokens = models.PositiveIntegerField(help_text="Length preference: hard token limit")
    register = models.CharField(max_length=16, choices=Register.choices)
    persona = models.TextField(blank=True, help_text="System prompt (language style)")
    temperature = models.FloatField(default=0.0)
    top_p = models.FloatField(default=1.0)
    repetition_penalty = models.FloatField(default=1.0)
    json_output = models.BooleanField(default=False, help_text="The answer must be JSON")
    regenerate_on_flags = models.BooleanField(
        default=False, help_text="Regenerate once when validation flags the answer"
    )
    source_path = models.CharField(max_length=200)
    checksum = models.CharField(max_length=64, help_text="sha256 of the profile file")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name", "-version"]
        constraints = [
            models.UniqueConstraint(fields=["name", "version"], name="uniq_profile_name_version")
        ]

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"

    @property
    def label(self) -> str:
        return f"{self.name}@v{self.version}"


class ChatResponseQuerySet(models.QuerySet):
    def with_feedback(self):
        return self.prefetch_related("feedback")


class ChatResponse(models.Model):
    """One answer given through /v1/chat, /v1/chat/completions or the chat page."""

    class Source(models.TextChoices):
        CHAT = "chat", "POST /v1/chat"
        COMPLETIONS = "completions", "POST /v1/chat/completions"
        PAGE = "page", "Chat page"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    source = models.CharField(max_length=16, choices=Source.choices)
    request_id = models.CharField(max_length=64, db_index=True)
    model_key = models.CharField(max_length=270, db_index=True)
    profile = models.ForeignKey(
        ResponseProfile, null=True, blank=True, on_delete=models.PROTECT, related_name="responses"
    )
    messages = models.JSONField(default=list, help_text="The conversation sent (profile applied)")
    controls = models.JSONField(default=dict, help_text="Decoding settings used")
    answer = models.TextField(blank=True)
    finish_reason = models.CharField(max_length=16, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    latency_ms = models.FloatField(default=0)
    cached = models.BooleanField(default=False)
    flags = models.JSONField(default=list, help_text="Output validation flags")
    regenerated = models.BooleanField(default=False)
    ledger_id = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    objects = ChatResponseQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.model_key} {self.request_id}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def prompt_text(self) -> str:
        users = [m.get("content") or "" for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else ""


class Feedback(models.Model):
    """A person's judgement of one response: thumbs, a 1-5 rating, tags, a corrected answer."""

    response = models.ForeignKey(ChatResponse, on_delete=models.CASCADE, related_name="feedback")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    thumb = models.SmallIntegerField(null=True, blank=True, help_text="+1 up, -1 down")
    rating = models.PositiveSmallIntegerField(null=True, blank=True, help_text="1-5")
    tags = models.JSONField(default=list)
    corrected_answer = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(rating__isnull=True) | Q(rating__gte=1, rating__lte=5),
                name="feedback_rating_1_5",
            ),
            models.CheckConstraint(
                condition=Q(thumb__isnull=True) | Q(thumb__in=[-1, 1]), name="feedback_thumb_pm1"
            ),
        ]

    def __str__(self) -> str:
        return f"feedback {self.pk} on {self.response_id}"


class FeedbackTrainingFile(models.Model):
    """A training file made from feedback: its version in the series and the rows it used."""

    training_file = models.OneToOneField(
        "corpora.TrainingFile", on_delete=models.CASCADE, related_name="feedback_source"
    )
    version = models.PositiveIntegerField()
    feedback = models.ManyToManyField(Feedback, related_name="training_files")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-version"]

    def __str__(self) -> str:
        return f"feedback training file v{self.version}"


# Batch LLM jobs (issue 14) keep their models in jobs/batch/models.py.
from jobs.batch.models import BatchJob, BatchStats, BatchTask, Framework, FrameworkVersion  # noqa: E402, F401
