"""Billing settings, read from django.conf.settings with these defaults.

Set any of them in config/settings.py (or the environment there) to change them:

BILLING_MONTHLY_BUDGET            500      dollars a month until an admin sets another
BILLING_APPROVAL_THRESHOLD        150      jobs estimated over this need an admin's approval
BILLING_ALERT_THRESHOLDS          80% email, 95% email + Slack
BILLING_HARD_CAP_PERCENT          100      running jobs are checkpointed and stopped here
BILLING_VARIANCE_ALERT_PERCENT    20       actual cost over the estimate by this much: alert
BILLING_SPOT_INTERRUPTIONS_PER_HOUR 0.02   expected spot interruptions per GPU hour (seed: a
                                           10-30% chance over a 12-hour run)
BILLING_TEMPLATE_TOKEN_FACTOR     1.15     model tokens per approximate token of the file
                                           (chat template markers, tokenizer differences)
BILLING_WORDS_TO_TOKENS           1.35     tokens per word when a file has no token count
BILLING_LOCAL_CONTENTION_ALLOWANCE 0.5     the local executor shares the machine's CPU: the
                                           high end of its estimates is stretched by this
                                           share of the point (other load can slow a run)
BILLING_ALERT_EMAILS              []       extra recipients of budget alerts (admins get them)
BILLING_LOCAL_GPU_TYPE            cpu-local  price catalog entry of the local executor
BILLING_RUNPOD_GPU_TYPE           h100-pcie-80gb  RunPod jobs that name no GPU type
BILLING_ATTRIBUTION_PREFIXES      ("client:", "project:")  tags that attribute spending
"""

from __future__ import annotations

import os
from decimal import Decimal

from django.conf import settings

DEFAULT_ALERT_THRESHOLDS = [
    {"percent": 80, "channels": ["email"]},
    {"percent": 95, "channels": ["email", "slack"]},
]


def _get(name: str, default):
    return getattr(settings, name, default)


def monthly_budget() -> Decimal:
    return Decimal(str(_get("BILLING_MONTHLY_BUDGET", "500")))


def approval_threshold() -> Decimal:
    return Decimal(str(_get("BILLING_APPROVAL_THRESHOLD", "150")))


def alert_thresholds() -> list[dict]:
    return [dict(t) for t in _get("BILLING_ALERT_THRESHOLDS", DEFAULT_ALERT_THRESHOLDS)]


def hard_cap_percent() -> int:
    return int(_get("BILLING_HARD_CAP_PERCENT", 100))


def alert_delivery_lease_s() -> float:
    """How long one process holds a budget alert it is delivering before another may take
    it over (the first was killed mid-delivery): longer than a delivery's retries."""
    return float(
        _get("BILLING_ALERT_DELIVERY_LEASE_S", os.environ.get("BILLING_ALERT_DELIVERY_LEASE_S", 60))
    )


def variance_alert_percent() -> float:
    return float(_get("BILLING_VARIANCE_ALERT_PERCENT", 20))


def spot_interruptions_per_hour() -> float:
    return float(_get("BILLING_SPOT_INTERRUPTIONS_PER_HOUR", 0.02))


def template_token_factor() -> float:
    return float(_get("BILLING_TEMPLATE_TOKEN_FACTOR", 1.15))


def words_to_tokens() -> float:
    return float(_get("BILLING_WORDS_TO_TOKENS", 1.35))


def local_contention_allowance() -> float:
    return float(_get("BILLING_LOCAL_CONTENTION_ALLOWANCE", 0.5))


def alert_emails() -> list[str]:
    return list(_get("BILLING_ALERT_EMAILS", []))


def local_gpu_type() -> str:
    return _get("BILLING_LOCAL_GPU_TYPE", "cpu-local")


def runpod_gpu_type() -> str:
    """The GPU type RunPod launches for jobs that name none (training.conf reads it)."""
    from training import conf as training_conf

    return training_conf.runpod_gpu_type()


def attribution_prefixes() -> tuple[str, ...]:
    return tuple(_get("BILLING_ATTRIBUTION_PREFIXES", ("client:", "project:")))


def slack_webhook_url() -> str:
    return _get("SLACK_WEBHOOK_URL", "")
