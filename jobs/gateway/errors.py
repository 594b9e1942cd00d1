"""The gateway's typed errors. Each is a CrucibleError, so the API maps it to the one error
envelope with its status (and a Retry-After header where ``retry_after`` is set)."""

from __future__ import annotations

import math
from typing import Any

from billing.services import BudgetExceeded as BillingBudgetExceeded
from config.errors import CrucibleError


class GatewayError(CrucibleError):
    """Base of every gateway error: .code, .message, .details, .transient, .retry_after."""

    status_code = 502
    code = "gateway_error"
    default_message = "The model gateway could not complete the call."

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        details: Any = None,
        transient: bool = False,
        retry_after: float | None = None,
    ):
        self.transient = transient
        self.retry_after = retry_after
        details = dict(details or {})
        if retry_after is not None:
            details.setdefault("retry_after", max(1, math.ceil(retry_after)))
        super().__init__(message, details=details, code=code)


class InvalidRequest(GatewayError):
    status_code = 422
    code = "validation_error"
    default_message = "The model request is not valid."


class UnknownModel(GatewayError):
    status_code = 404
    code = "unknown_model"
    default_message = "No such model in the registry."


class ModelDisabled(GatewayError):
    status_code = 403
    code = "model_disabled"
    default_message = "This model is disabled."


class ModelUnpriced(GatewayError):
    status_code = 403
    code = "model_unpriced"
    default_message = "This model has no price; an admin must allow it explicitly."


class BudgetExceeded(GatewayError, BillingBudgetExceeded):
    """The billing refusal (code ``budget_exceeded``, 409) the training side uses too."""

    status_code = 409
    code = "budget_exceeded"
    default_message = "This call would take the month over its budget."


class RateLimited(GatewayError):
    status_code = 429
    code = "rate_limited"
    default_message = "The model's rate limit is reached; try again later."


class CircuitOpen(GatewayError):
    status_code = 503
    code = "circuit_open"
    default_message = "The provider is failing; calls are paused for a moment."


class ProviderError(GatewayError):
    status_code = 502
    code = "provider_error"
    default_message = "The model provider returned an error."


class DeadlineExceeded(GatewayError):
    status_code = 504
    code = "deadline_exceeded"
    default_message = "The model call did not finish within its deadline."
