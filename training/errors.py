"""Typed training errors: a message a person can act on, a fix, and the configuration
changes a one-click retry applies (after the seed's error list)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ClassifiedError:
    error_type: str
    title: str
    message: str
    fix: str
    changes: dict = field(default_factory=dict)  # hyperparameter -> new value
    retryable: bool = True


def _oom(details: dict, config: dict) -> ClassifiedError:
    hp = config.get("hyperparameters", {})
    micro = int(details.get("micro_batch_size") or hp.get("micro_batch_size", 1))
    accumulation = int(
        details.get("gradient_accumulation_steps") or hp.get("gradient_accumulation_steps", 1)
    )
    seq = int(details.get("max_seq_length") or hp.get("max_seq_length", 2048))
    if micro > 1:
        new_micro = max(1, micro // 2)
        new_accumulation = accumulation * (micro // new_micro)
        changes = {"micro_batch_size": new_micro, "gradient_accumulation_steps": new_accumulation}
        fix = (
            f"Retry with micro_batch_size={new_micro} and gradient_accumulation_steps="
            f"{new_accumulation}: the effective batch stays {micro * accumulation}."
        )
    else:
        new_seq = max(64, seq // 2)
        changes = {"max_seq_length": new_seq}
        fix = f"micro_batch_size is already 1: retry with max_seq_length={new_seq}."
    return ClassifiedError(
        "OutOfMemoryError",
        "Out of GPU memory",
        f"micro_batch_size={micro} with sequences of {seq} tokens does not fit in memory.",
        fix,
        changes,
    )


def _dataset(details: dict, config: dict) -> ClassifiedError:
    where = []
    if details.get("row"):
        where.append(f"row {details['row']}")
    if details.get("conversation_id"):
        where.append(f"conversation {details['conversation_id']}")
    place = " (" + ", ".join(where) + ")" if where else ""
    field_name = details.get("field")
    return ClassifiedError(
        "DatasetFormatError",
        "The training file has a problem",
        f"Training file problem{place}" + (f", field '{field_name}'" if field_name else "") + ".",
        "Fix that row of the training file, upload it again, and start a new job with it.",
        retryable=False,
    )


def _nan(details: dict, config: dict) -> ClassifiedError:
    lr = config.get("hyperparameters", {}).get("learning_rate", 2e-4)
    return ClassifiedError(
        "NaNLossError",
        "The loss became NaN",
        f"Training diverged at learning_rate={lr:g}.",
        f"Retry with learning_rate={lr / 2:g}.",
        {"learning_rate": lr / 2},
    )


def _timeout(details: dict, config: dict) -> ClassifiedError:
    epochs = config.get("hyperparameters", {}).get("num_epochs", 3)
    changes = {"num_epochs": max(1, epochs - 1)} if epochs > 1 else {}
    return ClassifiedError(
        "TimeoutError",
        "The job ran past its time limit",
        "Training exceeded the time limit.",
        "Reduce epochs or increase the batch size"
        + (f": retry with num_epochs={epochs - 1}." if changes else "."),
        changes,
    )


_SIMPLE = {
    "ModelAccessError": (
        "The base model could not be downloaded",
        "Access to the base model was denied.",
        "Accept the model's licence on Hugging Face and set HF_TOKEN for the workers, then retry.",
    ),
    "GPUProvisioningError": (
        "No GPU available",
        "No GPU of the requested type is available right now.",
        "Retry in a few minutes, or switch to on-demand.",
    ),
    "NetworkError": (
        "Lost connection to the GPU instance",
        "The worker could not reach storage or the platform.",
        "Retry; the job resumes from its newest checkpoint.",
    ),
    "PlatformUnreachableError": (
        "The worker could not reach the platform",
        "No address of this platform answered, so a worker would not be able to report.",
        "Set CRUCIBLE_PUBLIC_URL to the address the web server answers on (for example "
        "http://127.0.0.1:8765 for `make demo PORT=8765`), or leave it unset and start the web "
        "server first, then retry.",
    ),
    "PlatformAddressError": (
        "RunPod workers cannot reach this platform",
        "CRUCIBLE_PUBLIC_URL is not an address a RunPod pod can reach.",
        "Set CRUCIBLE_PUBLIC_URL to this platform's public https address (not 127.0.0.1, "
        "localhost or a private network address), restart the web server and workers, "
        "then retry.",
    ),
    "WebhookDeliveryError": (
        "The worker's reports do not reach the platform",
        "The worker is running but its webhooks cannot be delivered.",
        "Set CRUCIBLE_PUBLIC_URL to an address the worker can reach (for `make demo`, pass the "
        "same PORT the server uses: `make demo PORT=8765`), restart the workers, then retry.",
    ),
    "InterruptionLimitError": (
        "Interrupted too often",
        "The worker stopped unexpectedly more times than the recovery limit allows.",
        "Check the worker log for the cause, then retry.",
    ),
}


def classify(error_type: str, message: str, details: dict, config: dict) -> ClassifiedError:
    details = details or {}
    if error_type == "OutOfMemoryError":
        return _oom(details, config)
    if error_type == "DatasetFormatError":
        base = _dataset(details, config)
        return ClassifiedError(
            base.error_type, base.title, message or base.message, base.fix, retryable=False
        )
    if error_type == "NaNLossError":
        return _nan(details, config)
    if error_type == "TimeoutError":
        return _timeout(details, config)
    if error_type == "GPUProvisioningError" and details.get("suggestion"):
        title, default_message, _ = _SIMPLE[error_type]
        return ClassifiedError(error_type, title, message or default_message, details["suggestion"])
    if error_type in _SIMPLE:
        title, default_message, fix = _SIMPLE[error_type]
        return ClassifiedError(error_type, title, message or default_message, fix)
    return ClassifiedError(
        error_type or "WorkerError",
        "The training worker failed",
        message or "The worker stopped with an error.",
        "Open the worker log and the error event for the traceback; retry once it is fixed.",
    )


def apply_changes(config: dict, changes: dict) -> dict:
    new = copy.deepcopy(config)
    new.setdefault("hyperparameters", {}).update(changes)
    return new


class GPUProvisioningError(Exception):
    """The provider has no capacity for the GPU type right now (raised by an executor's launch).

    ``suggestion`` is what the person can do; the launch is retried with backoff meanwhile.
    """

    error_type = "GPUProvisioningError"

    def __init__(self, message: str, *, gpu_type: str, spot: bool, suggestion: str = ""):
        super().__init__(message)
        self.message = message
        self.gpu_type = gpu_type
        self.spot = spot
        self.suggestion = suggestion or (
            "Retry in a few minutes, or switch to on-demand."
            if spot
            else "Retry in a few minutes, or choose another GPU type."
        )


class PlatformAddressError(Exception):
    """Launch refused because workers could not report to the platform's address.

    ``error_type`` is ``PlatformUnreachableError`` (nothing answers at the address a local
    worker would use) or ``PlatformAddressError`` (a loopback/private address for a remote
    worker). Permanent: the job fails at once with the fix.
    """

    def __init__(self, message: str, *, error_type: str = "PlatformAddressError", url: str = ""):
        super().__init__(message)
        self.message = message
        self.error_type = error_type
        self.url = url
