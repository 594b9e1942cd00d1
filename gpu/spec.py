"""The job spec (PROTOCOL.md §2): where it comes from, validation and defaults."""

from __future__ import annotations

import base64
import binascii
import copy
import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpu.errors import SpecError

SPEC_VERSION = 1
SOURCES = ("offline", "local", "hub")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
DEFAULT_MODEL = "SmolLM2-135M-Instruct"


@dataclass
class BaseModelSpec:
    name: str = DEFAULT_MODEL
    source: str = "offline"
    path: str | None = None
    revision: str | None = None


@dataclass
class TrainingFileSpec:
    uri: str
    sha256: str | None = None


@dataclass
class Hyperparameters:
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    learning_rate: float = 2e-4
    num_epochs: float = 3
    max_steps: int | None = None
    micro_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    max_seq_length: int = 1024
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42


@dataclass
class OutputSpec:
    uri: str
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    # Grants instead of keys (a worker on another machine, e.g. a RunPod pod): a presigned POST
    # policy limited to the job's prefix, {"url", "fields", "key_prefix"}, and presigned GET
    # URLs of the checkpoint to resume from, {key relative to uri: url}.
    upload: dict | None = None
    resume_files: dict | None = None


@dataclass
class WebhookSpec:
    url: str | None = None
    secret: str | None = None


@dataclass
class JobSpec:
    job_id: str
    base_model: BaseModelSpec
    training_file: TrainingFileSpec
    hyperparameters: Hyperparameters
    output: OutputSpec
    webhook: WebhookSpec
    spec_version: int = SPEC_VERSION
    validation_split: float = 0.2
    checkpoint_every_steps: int = 100
    logging_steps: int = 1
    heartbeat_seconds: float = 30
    device: str = "auto"
    resume: bool = True
    # Not part of the spec: problems that are worth a warning event but not a failure.
    warnings: list[str] = field(default_factory=list, repr=False)

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        data = asdict(self)
        data.pop("warnings")
        if redact and data["webhook"].get("secret"):
            data["webhook"]["secret"] = "***"  # noqa: S105 - a redaction mark, not a secret
        if redact and data["output"].get("upload"):
            data["output"]["upload"] = "***"  # a signed policy: a credential until it expires
        if redact and data["output"].get("resume_files"):
            data["output"]["resume_files"] = sorted(data["output"]["resume_files"])
        return data


# ---------------------------------------------------------------- loading


def _fetch_spec_url(url: str, attempts: int = 4) -> str:
    if not url.startswith(("http://", "https://")):
        raise SpecError(f"--spec-url must be http(s): {url!r}")
    delay = 1.0
    for attempt in range(1, attempts + 1):
        try:
            request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310 - scheme checked above
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - scheme checked above
                return response.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == attempts:
                raise SpecError(
                    f"Could not fetch the job spec: HTTP {exc.code} from {url}"
                ) from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            if attempt == attempts:
                raise SpecError(f"Could not fetch the job spec from {url}: {exc}") from exc
        time.sleep(delay)
        delay *= 2
    raise SpecError(f"Could not fetch the job spec from {url}")  # pragma: no cover


def load_raw_spec(
    spec_path: str | None = None,
    spec_url: str | None = None,
    environ: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The spec as a dict, from --spec, --spec-url, CRUCIBLE_JOB_SPEC or CRUCIBLE_JOB_SPEC_B64."""
    env = os.environ if environ is None else environ
    if spec_path:
        try:
            text = Path(spec_path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SpecError(f"Cannot read the spec file {spec_path}: {exc}") from exc
        origin = spec_path
    elif spec_url:
        text, origin = _fetch_spec_url(spec_url), spec_url
    elif env.get("CRUCIBLE_JOB_SPEC"):
        text, origin = env["CRUCIBLE_JOB_SPEC"], "CRUCIBLE_JOB_SPEC"
    elif env.get("CRUCIBLE_JOB_SPEC_B64"):
        try:
            text = base64.b64decode(env["CRUCIBLE_JOB_SPEC_B64"], validate=False).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise SpecError(f"CRUCIBLE_JOB_SPEC_B64 is not valid base64 UTF-8: {exc}") from exc
        origin = "CRUCIBLE_JOB_SPEC_B64"
    else:
        raise SpecError(
            "No job spec: pass --spec FILE or --spec-url URL, or set CRUCIBLE_JOB_SPEC / "
            "CRUCIBLE_JOB_SPEC_B64"
        )
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"The job spec from {origin} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"The job spec from {origin} must be a JSON object")
    return raw


# ---------------------------------------------------------------- validation


def _section(raw: dict, key: str, required: bool = False) -> dict:
    value = raw.get(key)
    if value is None:
        if required:
            raise SpecError(f"spec.{key} is required")
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"spec.{key} must be an object")
    return value


def _fill(cls, values: dict, where: str, warnings: list[str]):
    known = set(cls.__dataclass_fields__)
    for key in values:
        if key not in known:
            warnings.append(f"Unknown field {where}.{key} ignored")
    kwargs = {k: copy.deepcopy(v) for k, v in values.items() if k in known and v is not None}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise SpecError(f"spec.{where}: {exc}") from exc


def _check_number(
    where: str,
    value,
    *,
    integer=False,
    minimum=None,
    maximum=None,
    exclusive_min=False,
    exclusive_max=False,
):
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise SpecError(f"spec.{where} must be {kind}, got {value!r}")
    if minimum is not None and (value < minimum or (exclusive_min and value == minimum)):
        raise SpecError(
            f"spec.{where} must be {'>' if exclusive_min else '>='} {minimum}, got {value!r}"
        )
    if maximum is not None and (value > maximum or (exclusive_max and value == maximum)):
        raise SpecError(
            f"spec.{where} must be {'<' if exclusive_max else '<='} {maximum}, got {value!r}"
        )


def _check_choice(where: str, value, choices):
    if value not in choices:
        raise SpecError(f"spec.{where} must be one of {', '.join(choices)}; got {value!r}")


def resolve_spec(raw: dict[str, Any]) -> JobSpec:
    """Validate the raw spec and fill in every default; raises SpecError."""
    if not isinstance(raw, dict):
        raise SpecError("The job spec must be a JSON object")
    warnings: list[str] = []
    top_known = set(JobSpec.__dataclass_fields__) - {"warnings"}
    for key in raw:
        if key not in top_known:
            warnings.append(f"Unknown field {key} ignored")

    version = raw.get("spec_version", SPEC_VERSION)
    if version != SPEC_VERSION:
        raise SpecError(
            f"Unsupported spec_version {version!r}; this worker reads version {SPEC_VERSION}"
        )
    job_id = raw.get("job_id")
    if not isinstance(job_id, str) or not job_id.strip():
        raise SpecError("spec.job_id is required (a non-empty string)")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", job_id):
        raise SpecError("spec.job_id may only hold letters, digits, '.', '_' and '-'")

    base = _fill(BaseModelSpec, _section(raw, "base_model"), "base_model", warnings)
    _check_choice("base_model.source", base.source, SOURCES)
    if base.source in ("local", "hub") and not (isinstance(base.path, str) and base.path.strip()):
        raise SpecError(f"spec.base_model.path is required when source is {base.source!r}")
    if not isinstance(base.name, str) or not base.name.strip():
        raise SpecError("spec.base_model.name must be a non-empty string")

    tf = _section(raw, "training_file", required=True)
    if not isinstance(tf.get("uri"), str) or not tf["uri"]:
        raise SpecError("spec.training_file.uri is required")
    training_file = _fill(TrainingFileSpec, tf, "training_file", warnings)
    if not training_file.uri.startswith(("file://", "s3://", "http://", "https://", "/")):
        raise SpecError(
            "spec.training_file.uri must be file://, s3://, http(s):// or an absolute path"
        )
    if training_file.sha256 is not None and not re.fullmatch(
        r"[0-9a-fA-F]{64}", str(training_file.sha256)
    ):
        raise SpecError("spec.training_file.sha256 must be 64 hex digits or null")

    hp = _fill(Hyperparameters, _section(raw, "hyperparameters"), "hyperparameters", warnings)
    h = "hyperparameters."
    _check_number(h + "lora_r", hp.lora_r, integer=True, minimum=1)
    _check_number(h + "lora_alpha", hp.lora_alpha, minimum=0, exclusive_min=True)
    _check_number(h + "lora_dropout", hp.lora_dropout, minimum=0, maximum=1, exclusive_max=True)
    tm = hp.target_modules
    if not (
        (isinstance(tm, str) and tm == "all-linear")
        or (isinstance(tm, list) and tm and all(isinstance(m, str) and m for m in tm))
    ):
        raise SpecError(
            f"spec.{h}target_modules must be a non-empty list of module names or 'all-linear'"
        )
    _check_number(h + "learning_rate", hp.learning_rate, minimum=0, exclusive_min=True)
    _check_number(h + "num_epochs", hp.num_epochs, minimum=0, exclusive_min=True)
    if hp.max_steps is not None:
        _check_number(h + "max_steps", hp.max_steps, integer=True, minimum=1)
    _check_number(h + "micro_batch_size", hp.micro_batch_size, integer=True, minimum=1)
    _check_number(
        h + "gradient_accumulation_steps", hp.gradient_accumulation_steps, integer=True, minimum=1
    )
    _check_number(h + "max_seq_length", hp.max_seq_length, integer=True, minimum=32)
    _check_number(h + "warmup_ratio", hp.warmup_ratio, minimum=0, maximum=1, exclusive_max=True)
    _check_choice(h + "lr_scheduler", hp.lr_scheduler, SCHEDULERS)
    _check_number(h + "weight_decay", hp.weight_decay, minimum=0)
    _check_number(h + "max_grad_norm", hp.max_grad_norm, minimum=0)
    _check_number(h + "seed", hp.seed, integer=True, minimum=0)

    out = _section(raw, "output", required=True)
    if not isinstance(out.get("uri"), str) or not out["uri"]:
        raise SpecError("spec.output.uri is required")
    output = _fill(OutputSpec, out, "output", warnings)
    if not output.uri.startswith(("file://", "s3://", "/")):
        raise SpecError("spec.output.uri must be file://, s3:// or an absolute path")
    if output.uri.startswith("s3://") and not re.fullmatch(r"s3://[^/]+(/.*)?", output.uri):
        raise SpecError("spec.output.uri: s3 URIs look like s3://bucket/prefix")
    _check_grants(output)

    webhook = _fill(WebhookSpec, _section(raw, "webhook"), "webhook", warnings)
    if webhook.url is not None:
        if not isinstance(webhook.url, str) or not webhook.url.startswith(("http://", "https://")):
            raise SpecError("spec.webhook.url must be an http(s) URL or null")
        if not isinstance(webhook.secret, str) or not webhook.secret:
            raise SpecError("spec.webhook.secret is required when webhook.url is set")

    spec = JobSpec(
        job_id=job_id,
        base_model=base,
        training_file=training_file,
        hyperparameters=hp,
        output=output,
        webhook=webhook,
        spec_version=version,
        warnings=warnings,
    )
    for key in (
        "validation_split",
        "checkpoint_every_steps",
        "logging_steps",
        "heartbeat_seconds",
        "device",
        "resume",
    ):
        if raw.get(key) is not None:
            setattr(spec, key, raw[key])
    _check_number(
        "validation_split", spec.validation_split, minimum=0, maximum=1, exclusive_max=True
    )
    _check_number("checkpoint_every_steps", spec.checkpoint_every_steps, integer=True, minimum=1)
    _check_number("logging_steps", spec.logging_steps, integer=True, minimum=1)
    _check_number("heartbeat_seconds", spec.heartbeat_seconds, minimum=0, exclusive_min=True)
    _check_choice("device", spec.device, DEVICES)
    if not isinstance(spec.resume, bool):
        raise SpecError("spec.resume must be true or false")
    return spec


def _is_http_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def _check_grants(output: OutputSpec) -> None:
    if output.upload is not None:
        upload = output.upload
        if not output.uri.startswith("s3://"):
            raise SpecError("spec.output.upload needs an s3:// output.uri")
        if (
            not isinstance(upload, dict)
            or not _is_http_url(upload.get("url"))
            or not isinstance(upload.get("fields"), dict)
            or not isinstance(upload.get("key_prefix"), str)
        ):
            raise SpecError(
                "spec.output.upload must be {url: http(s) URL, fields: {...}, key_prefix: str}"
            )
        bucket_prefix = output.uri[len("s3://") :].partition("/")[2].strip("/")
        if upload["key_prefix"].strip("/") != bucket_prefix:
            raise SpecError("spec.output.upload.key_prefix must be the output.uri's prefix")
    if output.resume_files is not None:
        files = output.resume_files
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and _is_http_url(v) for k, v in files.items()
        ):
            raise SpecError("spec.output.resume_files must map keys to http(s) URLs")


def webhook_from_raw(raw: Any) -> tuple[str | None, str | None, str | None]:
    """Best effort (job_id, url, secret) from an invalid spec, to report the failure."""
    if not isinstance(raw, dict):
        return None, None, None
    hook = raw.get("webhook") if isinstance(raw.get("webhook"), dict) else {}
    job_id = raw.get("job_id") if isinstance(raw.get("job_id"), str) else None
    url = hook.get("url") if isinstance(hook.get("url"), str) else None
    secret = hook.get("secret") if isinstance(hook.get("secret"), str) else None
    return job_id, url, secret
