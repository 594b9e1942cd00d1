"""The RunPod executor: the worker image (gpu/Dockerfile) on an on-demand or spot GPU pod.

Built on the ``runpod`` SDK: on-demand pods with ``runpod.create_pod``
(``podFindAndDeployOnDemand``); spot pods with RunPod's ``podRentInterruptable`` mutation and
a bid per GPU, sent through the SDK's GraphQL helper (the SDK has no function for it). The job
spec travels base64-encoded in ``CRUCIBLE_JOB_SPEC_B64`` (gpu/PROTOCOL.md); the pod gets the
job's own webhook secret, storage grants (``pod_grants``: presigned GET URLs for what it reads,
a presigned POST policy for its job's prefix; never the platform's S3 keys) and the model cache
on the volume, never the platform's RunPod API key.

The handle stored on the job is the pod id. Every pod gets a ``TrainingPod`` row, so pods that
outlive their job (a stopped pod still bills for its storage) are found and terminated.
``RUNPOD_API_BASE_URL`` points the SDK at another API (the tests' loopback RunPod).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import time
from collections.abc import Callable
from decimal import Decimal
from typing import TypeVar
from urllib.parse import urlparse

import requests
import runpod
from django.conf import settings
from django.core.cache import cache
from django.utils import timezone
from django.utils.text import slugify
from runpod import error as runpod_error
from runpod.api.graphql import run_graphql_query

from config.addresses import explicit_public_url, is_private_address
from config.errors import ExternalServiceError
from config.retry import call_with_retry
from training import conf as training_conf
from training.errors import GPUProvisioningError, PlatformAddressError
from training.executors.base import ExecutorState, ExecutorStatus

logger = logging.getLogger("crucible.training.runpod")

SERVICE = "runpod"
HEALTH_CACHE_KEY = "runpod:last-call"
# RunPod's answers when it has no machine for the request, e.g. "There are no longer any
# instances available with the requested specifications. Please refresh and try again."
_NO_CAPACITY = re.compile(
    r"no longer any instances available|no (gpu )?instances? (are )?(currently )?available"
    r"|not enough (free )?gpus|out of capacity|insufficient capacity",
    re.IGNORECASE,
)
_TRANSIENT = re.compile(r"rate limit|too many requests|timed? ?out|internal server|try again", re.I)
_NOT_FOUND = re.compile(r"not found|does not exist|no pod", re.IGNORECASE)
_ENDED = {"EXITED", "TERMINATED", "DEAD", "PAUSED"}
_GPU_TYPES_QUERY = """
query GpuTypes {
  gpuTypes {
    id
    displayName
    memoryInGb
    securePrice
    communityPrice
    secureSpotPrice
    communitySpotPrice
    lowestPrice(input: {gpuCount: 1}) {
      minimumBidPrice
      uninterruptablePrice
    }
  }
}
"""
_GPU_CACHE_SECONDS = 600.0
_gpu_cache: dict = {"at": 0.0, "rows": []}

T = TypeVar("T")


# --- Configuration and calls ------------------------------------------------------------------


def configured() -> bool:
    return bool(settings.RUNPOD_API_KEY)


def _configure() -> None:
    if not settings.RUNPOD_API_KEY:
        raise ExternalServiceError(
            "RunPod is not configured: set RUNPOD_API_KEY.", service=SERVICE, transient=False
        )
    runpod.api_key = settings.RUNPOD_API_KEY
    # The SDK reads its base URL from the environment at every call (runpod/api/graphql.py).
    if settings.RUNPOD_API_BASE_URL:
        os.environ["RUNPOD_API_BASE_URL"] = settings.RUNPOD_API_BASE_URL.rstrip("/")
    else:
        os.environ.pop("RUNPOD_API_BASE_URL", None)


def _record_health(ok: bool, what: str, error: str = "") -> None:
    try:
        cache.set(
            HEALTH_CACHE_KEY,
            {"ok": ok, "what": what, "error": error[:300], "at": timezone.now().isoformat()},
            timeout=24 * 3600,
        )
    except Exception:  # the cache is a nicety for /readyz, never a reason to fail a call
        logger.debug("could not record RunPod health", exc_info=True)


def _translate(exc: Exception, what: str, *, gpu_type: str, spot: bool) -> Exception:
    """The SDK's exceptions as ours: capacity, transient or permanent."""
    if isinstance(exc, runpod_error.AuthenticationError):
        return ExternalServiceError(
            f"RunPod refused the API key ({what}): {exc}", service=SERVICE, transient=False
        )
    if isinstance(exc, runpod_error.QueryError):
        message = str(exc)
        if _NO_CAPACITY.search(message):
            kind = "spot" if spot else "on-demand"
            return GPUProvisioningError(
                f"No {gpu_type} GPUs available on RunPod ({kind}): {message}",
                gpu_type=gpu_type,
                spot=spot,
            )
        return ExternalServiceError(
            f"RunPod {what} failed: {message}",
            service=SERVICE,
            transient=bool(_TRANSIENT.search(message)),
        )
    if isinstance(exc, requests.exceptions.JSONDecodeError):
        # Not JSON: a proxy's or the API's error page (5xx); worth another try.
        return ExternalServiceError(
            f"RunPod {what}: the API answered with something other than JSON",
            service=SERVICE,
            transient=True,
        )
    if isinstance(exc, requests.RequestException):
        return ExternalServiceError(
            f"RunPod unreachable ({what}): {type(exc).__name__}: {exc}",
            service=SERVICE,
            transient=True,
        )
    if isinstance(exc, ValueError):  # the SDK's own checks (unknown GPU id, cloud type)
        return ExternalServiceError(f"RunPod {what}: {exc}", service=SERVICE, transient=False)
    return exc


def _call(
    fn: Callable[[], T], *, what: str, gpu_type: str = "", spot: bool = False, attempts: int = 3
) -> T:
    """Call the SDK; transient faults are retried (backoff + jitter), then raised as such."""
    _configure()

    def once() -> T:
        try:
            return fn()
        except Exception as exc:  # translated below, re-raised when not one we know
            translated = _translate(exc, what, gpu_type=gpu_type, spot=spot)
            if translated is exc:
                raise
            raise translated from exc

    try:
        result = call_with_retry(once, attempts=attempts, initial=0.5, maximum=4.0, deadline=20)
    except GPUProvisioningError:
        _record_health(True, what)  # the API answered; it had no machine
        raise
    except ExternalServiceError as exc:
        _record_health(False, what, exc.message)
        raise
    _record_health(True, what)
    return result


def _gql_string(value: str) -> str:
    # A JSON string literal is a valid GraphQL string literal (same escapes).
    return json.dumps(str(value))


# --- GPU types and prices ---------------------------------------------------------------------


def gpu_slug(row: dict) -> str:
    """The price catalogue's name for a RunPod GPU type: "H100 PCIe", 80 GB -> h100-pcie-80gb."""
    return slugify(f"{row.get('displayName') or row['id']} {row.get('memoryInGb') or ''}gb")


def gpu_types(*, refresh: bool = False) -> list[dict]:
    """RunPod's GPU types with their prices (cached for a few minutes in this process)."""
    stale = time.monotonic() - _gpu_cache["at"] > _GPU_CACHE_SECONDS
    if refresh or stale or not _gpu_cache["rows"]:
        rows = _call(lambda: run_graphql_query(_GPU_TYPES_QUERY), what="GPU types")
        _gpu_cache["rows"] = rows["data"]["gpuTypes"] or []
        _gpu_cache["at"] = time.monotonic()
    return _gpu_cache["rows"]


def _prices(row: dict) -> tuple[float | None, float | None]:
    """(spot, on-demand) per GPU hour for the configured cloud type."""
    cloud = settings.RUNPOD_CLOUD_TYPE.upper()
    lowest = row.get("lowestPrice") or {}
    if cloud == "SECURE":
        spot, demand = row.get("secureSpotPrice"), row.get("securePrice")
    elif cloud == "COMMUNITY":
        spot, demand = row.get("communitySpotPrice"), row.get("communityPrice")
    else:
        spot, demand = lowest.get("minimumBidPrice"), lowest.get("uninterruptablePrice")
    spot = spot or lowest.get("minimumBidPrice")
    demand = demand or lowest.get("uninterruptablePrice")
    return (float(spot) if spot else None), (float(demand) if demand else None)


def gpu_prices() -> list[dict]:
    """Live prices for billing's catalogue (billing.services.gpu_prices_refresh)."""
    out = []
    for row in gpu_types(refresh=True):
        spot, demand = _prices(row)
        if not demand:
            continue  # not rentable in this cloud type
        out.append(
            {
                "gpu_type": gpu_slug(row),
                "display_name": f"{row['id']} {row.get('memoryInGb') or ''}GB (RunPod)".replace(
                    "  ", " "
                ),
                "spot_per_hour": spot if spot is not None else demand,
                "on_demand_per_hour": demand,
                "runpod_id": row["id"],
            }
        )
    return out


def resolve_gpu_type(name: str) -> dict:
    """A RunPod GPU type row from its id ("NVIDIA H100 PCIe"), display name or catalogue slug."""
    for refresh in (False, True):
        for row in gpu_types(refresh=refresh):
            if name in (row["id"], row.get("displayName")) or slugify(name) == gpu_slug(row):
                return row
    known = ", ".join(gpu_slug(r) for r in gpu_types())
    raise ExternalServiceError(
        f"RunPod has no GPU type '{name}'. Known: {known}.", service=SERVICE, transient=False
    )


# --- Pods -------------------------------------------------------------------------------------


def pod_name(job_id: str, attempt: int) -> str:
    return f"{settings.RUNPOD_POD_NAME_PREFIX}-{job_id}-a{attempt}"


def parse_pod_name(name: str) -> tuple[str, int] | None:
    """(job id, attempt) of a pod this installation named; None for anyone else's pod."""
    prefix = f"{settings.RUNPOD_POD_NAME_PREFIX}-"
    if not name or not name.startswith(prefix):
        return None
    match = re.fullmatch(r"([0-9a-f-]{36})-a(\d+)", name[len(prefix) :])
    return (match.group(1), int(match.group(2))) if match else None


def _spot_mutation(*, bid_per_gpu: float, common: dict) -> str:
    """RunPod's podRentInterruptable (PodRentInterruptableInput), like the SDK's on-demand one."""
    fields = [
        f"bidPerGpu: {bid_per_gpu}",
        f"name: {_gql_string(common['name'])}",
        f"imageName: {_gql_string(common['image_name'])}",
        f"gpuTypeId: {_gql_string(common['gpu_type_id'])}",
        f"cloudType: {common['cloud_type']}",
        f"gpuCount: {int(common['gpu_count'])}",
        f"containerDiskInGb: {int(common['container_disk_in_gb'])}",
        f"volumeInGb: {int(common['volume_in_gb'])}",
        f"volumeMountPath: {_gql_string(common['volume_mount_path'])}",
        "startSsh: false",
        "supportPublicIp: false",
        "env: ["
        + ", ".join(
            f"{{key: {_gql_string(k)}, value: {_gql_string(v)}}}" for k, v in common["env"].items()
        )
        + "]",
    ]
    if common.get("network_volume_id"):
        fields.append(f"networkVolumeId: {_gql_string(common['network_volume_id'])}")
    if common.get("data_center_id"):
        fields.append(f"dataCenterId: {_gql_string(common['data_center_id'])}")
    return (
        "mutation {\n  podRentInterruptable(input: {"
        + ", ".join(fields)
        + "}) {\n    id\n    desiredStatus\n    imageName\n    machineId\n    costPerHr\n  }\n}"
    )


def _is_loopback(url: str) -> bool:
    return (urlparse(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


# --- Least privilege: what a pod may read and write ----------------------------------------

STORAGE_KEY_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _resume_checkpoint(output_path: str) -> tuple[int, list[str]] | None:
    """The newest checkpoint under the job's output whose manifest lists files that are all
    stored with their sizes: (step, keys relative to the output, manifest first). The worker
    still checks every sha256 against the manifest and starts over if one does not match."""
    from config.storage import storage_read, storage_tree

    tree = storage_tree(f"{output_path}/checkpoints")
    steps = sorted(
        {int(m.group(1)) for k in tree if (m := re.match(r"step-(\d+)/", k))}, reverse=True
    )
    for step in steps:
        folder = f"step-{step:06d}"
        if f"{folder}/manifest.json" not in tree:
            continue
        try:
            manifest = json.loads(storage_read(f"{output_path}/checkpoints/{folder}/manifest.json"))
            files = [(e["path"], int(e["size"])) for e in manifest["files"]]
        except (ValueError, KeyError, TypeError):
            continue
        if all(tree.get(f"{folder}/{path}") == size for path, size in files):
            keys = [f"checkpoints/{folder}/manifest.json"]
            return step, keys + [f"checkpoints/{folder}/{path}" for path, _ in files]
    return None


def pod_grants(*, spec: dict, env: dict) -> tuple[dict, dict]:
    """The spec and environment a pod gets on S3: no storage keys, only presigned GET URLs
    for the training file and the checkpoint it resumes from, and a presigned POST policy
    for the job's own prefix, all expiring after the job's maximum duration
    (TRAINING_MAX_DURATION_HOURS). On local disk (the loopback RunPod in tests) unchanged."""
    from config.storage import (
        storage_is_s3,
        storage_path_from_uri,
        storage_presigned_get,
        storage_presigned_post,
    )

    env = {k: v for k, v in env.items() if k.upper() not in STORAGE_KEY_VARIABLES}
    if not storage_is_s3():
        return spec, env
    expires = int(settings.TRAINING_MAX_DURATION_HOURS * 3600)
    spec = json.loads(json.dumps(spec))  # a copy: the caller's spec stays as built
    training_path = storage_path_from_uri(spec["training_file"]["uri"])
    spec["training_file"]["uri"] = storage_presigned_get(training_path, expires=expires)
    output = spec["output"]
    output_path = storage_path_from_uri(output["uri"])
    output["upload"] = storage_presigned_post(output_path, expires=expires)
    found = _resume_checkpoint(output_path) if spec.get("resume", True) else None
    output["resume_files"] = {
        key: storage_presigned_get(f"{output_path}/{key}", expires=expires)
        for key in (found[1] if found else [])
    }
    return spec, env


class RunPodExecutor:
    name = "runpod"

    # ------------------------------------------------------------------ launch
    def pod_env(self, *, spec: dict, env: dict, attempt: int) -> dict[str, str]:
        """What the pod's container gets: the spec (with its grants), the cache paths."""
        mount = settings.RUNPOD_VOLUME_MOUNT_PATH.rstrip("/")
        values = {
            # Never the platform's own RunPod key, whatever the caller passed.
            key: str(value)
            for key, value in env.items()
            if not key.upper().startswith("RUNPOD_")
        }
        values |= {
            "CRUCIBLE_JOB_SPEC_B64": base64.b64encode(json.dumps(spec).encode()).decode(),
            "CRUCIBLE_MODEL_CACHE": f"{mount}/crucible/models",
            "HF_HOME": f"{mount}/huggingface",
            "CRUCIBLE_ATTEMPT": str(attempt),
        }
        for key, value in values.items():
            # runpod.create_pod writes env values into the GraphQL text without escaping.
            if any(c in value for c in '"\\\n\r'):
                raise ExternalServiceError(
                    f"Environment variable {key} holds a character RunPod's SDK cannot send.",
                    service=SERVICE,
                    transient=False,
                )
        return values

    def launch(self, *, job_id: str, attempt: int, spec: dict, env: dict) -> str:
        from training.models import TrainingJob, TrainingPod

        job = TrainingJob.objects.get(pk=job_id)
        webhook = (spec.get("webhook") or {}).get("url") or ""
        if is_private_address(webhook) and not _is_loopback(settings.RUNPOD_API_BASE_URL):
            # A pod elsewhere cannot reach it: the job would train unheard and be "recovered".
            base = webhook.split("/api/v1/", 1)[0]
            raise PlatformAddressError(
                f"RunPod workers report to {base}, a loopback or private address they cannot "
                "reach"
                + ("" if explicit_public_url() else " (CRUCIBLE_PUBLIC_URL is not set)")
                + ": set CRUCIBLE_PUBLIC_URL to this platform's public address.",
                url=base,
            )
        if spec.get("output", {}).get("uri", "").startswith("file://") and not _is_loopback(
            settings.RUNPOD_API_BASE_URL
        ):
            raise ExternalServiceError(
                "RunPod workers cannot reach this machine's local storage: set S3_BUCKET so "
                "checkpoints and adapters go to S3.",
                service=SERVICE,
                transient=False,
            )
        spec, env = pod_grants(spec=spec, env=env)
        wanted = job.gpu_type or training_conf.runpod_gpu_type()
        spot = job.spot_for_next_launch
        gpu = resolve_gpu_type(wanted)
        spot_price, demand_price = _prices(gpu)
        count = max(1, settings.RUNPOD_GPU_COUNT)
        common = {
            "name": pod_name(job_id, attempt),
            "image_name": settings.RUNPOD_IMAGE,
            "gpu_type_id": gpu["id"],
            "cloud_type": settings.RUNPOD_CLOUD_TYPE.upper(),
            "gpu_count": count,
            "container_disk_in_gb": settings.RUNPOD_CONTAINER_DISK_GB,
            "volume_in_gb": 0 if settings.RUNPOD_NETWORK_VOLUME_ID else settings.RUNPOD_VOLUME_GB,
            "volume_mount_path": settings.RUNPOD_VOLUME_MOUNT_PATH,
            "env": self.pod_env(spec=spec, env=env, attempt=attempt),  # grants, not keys
            "network_volume_id": settings.RUNPOD_NETWORK_VOLUME_ID or None,
            "data_center_id": settings.RUNPOD_DATA_CENTER_ID or None,
        }
        bid = None
        if spot:
            minimum = spot_price  # the cloud type's spot price, else RunPod's minimum bid
            if not minimum:
                raise GPUProvisioningError(
                    f"RunPod offers no spot price for {gpu['id']} right now.",
                    gpu_type=gpu["id"],
                    spot=True,
                )
            bid = round(float(minimum) * settings.RUNPOD_SPOT_BID_MULTIPLIER, 4)
            if common["network_volume_id"] and not common["data_center_id"]:
                # A pod with a network volume must run in the volume's data centre (create_pod
                # looks it up the same way for on-demand pods).
                user = _call(lambda: runpod.get_user(), what="network volumes")
                common["data_center_id"] = next(
                    (
                        v.get("dataCenterId")
                        for v in user.get("networkVolumes") or []
                        if v.get("id") == common["network_volume_id"]
                    ),
                    None,
                )
            mutation = _spot_mutation(bid_per_gpu=bid, common=common)
            pod = _call(
                lambda: run_graphql_query(mutation)["data"]["podRentInterruptable"],
                what="spot pod",
                gpu_type=gpu["id"],
                spot=True,
            )
        else:
            pod = _call(
                lambda: runpod.create_pod(start_ssh=False, support_public_ip=False, **common),
                what="on-demand pod",
                gpu_type=gpu["id"],
                spot=False,
            )
        if not pod or not pod.get("id"):
            raise GPUProvisioningError(
                f"RunPod returned no pod for {gpu['id']}.", gpu_type=gpu["id"], spot=spot
            )
        rate = (bid if spot else demand_price) or 0
        TrainingPod.objects.create(
            job=job,
            attempt=attempt,
            pod_id=pod["id"],
            name=common["name"],
            gpu_type=gpu["id"],
            gpu_count=count,
            cloud_type=common["cloud_type"],
            spot=spot,
            bid_per_gpu=Decimal(str(bid)) if bid is not None else None,
            cost_per_hour=Decimal(str(round(rate * count, 4))),
        )
        logger.info(
            "job %s attempt %s: %s pod %s (%s x%s%s)",
            job_id,
            attempt,
            "spot" if spot else "on-demand",
            pod["id"],
            gpu["id"],
            count,
            f", bid {bid}/GPU/h" if spot else "",
        )
        return pod["id"]

    # ------------------------------------------------------------------ state
    def pod(self, ref: str) -> dict | None:
        """The pod as the API reports it, None when it no longer exists."""
        try:
            return _call(lambda: runpod.get_pod(ref), what="pod query")
        except ExternalServiceError as exc:
            if not exc.transient and _NOT_FOUND.search(exc.message):
                return None
            raise

    def status(self, *, ref: str) -> ExecutorStatus:
        from training.models import TrainingPod

        try:
            pod = self.pod(ref)
        except ExternalServiceError as exc:
            # RunPod's fault or the network's, not the job's: no verdict this time.
            return ExecutorStatus(ExecutorState.UNKNOWN, detail=exc.message)
        now = timezone.now()
        if pod is None:
            status = ExecutorStatus(ExecutorState.GONE, detail="the pod no longer exists")
        else:
            desired = (pod.get("desiredStatus") or "").upper()
            detail = pod.get("lastStatusChange") or desired
            if desired in _ENDED:
                status = ExecutorStatus(ExecutorState.EXITED, detail=detail)
            elif desired == "RUNNING" and pod.get("runtime"):
                status = ExecutorStatus(ExecutorState.RUNNING, detail=detail)
            elif desired in ("RUNNING", "CREATED", "RESTARTING", "STARTING"):
                status = ExecutorStatus(ExecutorState.STARTING, detail=detail)
            else:
                status = ExecutorStatus(ExecutorState.UNKNOWN, detail=f"pod status {desired}")
        if status.state != ExecutorState.UNKNOWN:
            updates = {"state": status.state.value, "last_checked_at": now, "detail": status.detail}
            updates = {k: v[:300] if isinstance(v, str) else v for k, v in updates.items()}
            TrainingPod.objects.filter(pod_id=ref, terminated_at__isnull=True).update(**updates)
            if not status.alive:
                TrainingPod.objects.filter(pod_id=ref, ended_at__isnull=True).update(ended_at=now)
        return status

    def cancel(self, *, ref: str, force: bool = False) -> None:
        """Stop the pod (SIGTERM: the worker checkpoints), or terminate it when ``force``.

        RunPod being unreachable does not block a cancel: the job's pods are terminated by
        the reconcile step once the job is over."""
        try:
            if force:
                self.release(ref=ref)
            else:
                _call(lambda: runpod.stop_pod(ref), what="stop pod")
        except ExternalServiceError as exc:
            logger.warning("could not %s pod %s: %s", "terminate" if force else "stop", ref, exc)

    def release(self, *, ref: str) -> None:
        """Terminate the pod (a stopped pod still bills for storage). Done when it is gone."""
        from training.models import TrainingPod

        try:
            _call(lambda: runpod.terminate_pod(ref), what="terminate pod")
        except ExternalServiceError as exc:
            if exc.transient or not _NOT_FOUND.search(exc.message):
                raise
        now = timezone.now()
        TrainingPod.objects.filter(pod_id=ref, terminated_at__isnull=True).update(
            state=TrainingPod.State.TERMINATED, terminated_at=now
        )
        TrainingPod.objects.filter(pod_id=ref, ended_at__isnull=True).update(ended_at=now)

    def list_pods(self) -> list[dict]:
        return _call(lambda: runpod.get_pods(), what="pod list") or []

    def logs(self, *, job_id: str, tail: int = 200) -> str:
        from training.models import TrainingPod

        lines = [
            f"{p.created_at:%Y-%m-%d %H:%M:%S} attempt {p.attempt}: "
            f"{'spot' if p.spot else 'on-demand'} pod {p.pod_id} "
            f"({p.gpu_type} x{p.gpu_count}) {p.state}"
            + (f", terminated {p.terminated_at:%H:%M:%S}" if p.terminated_at else "")
            + (f" - {p.detail}" if p.detail else "")
            for p in TrainingPod.objects.filter(job_id=job_id)
        ]
        lines.append(
            "The worker's own output is in the RunPod console (Pods > Logs); its events are "
            "in this job's event list."
        )
        return "\n".join(lines[-tail:])
