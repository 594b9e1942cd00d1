"""Checkpoints in the output location: complete or not at all (PROTOCOL.md §3).

A checkpoint is the trainer's folder (adapter, optimizer, scheduler, RNG, trainer_state.json)
plus ``crucible_state.json`` (the worker's own running totals), uploaded file by file to
``checkpoints/step-NNNNNN/``; ``manifest.json`` (step, created_at, files with size and sha256)
goes up last. Resuming takes the newest checkpoint whose manifest exists and whose files all
match it; anything else is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from gpu.storage import Storage, sha256_file

log = logging.getLogger("crucible.worker.checkpoints")

ROOT = "checkpoints"
MANIFEST = "manifest.json"
CRUCIBLE_STATE = "crucible_state.json"
_STEP_DIR = re.compile(r"^checkpoints/step-(\d+)/")


def checkpoint_rel(step: int) -> str:
    return f"{ROOT}/step-{step:06d}"


def build_manifest(local_dir: str | Path, step: int) -> dict:
    local_dir = Path(local_dir)
    files = []
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(local_dir).as_posix()
        if rel == MANIFEST:
            continue
        files.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    return {"step": step, "created_at": datetime.now(UTC).isoformat(), "files": files}


def publish_checkpoint(storage: Storage, local_dir: str | Path, step: int) -> dict:
    """Upload every file, then the manifest. Returns uri, manifest_uri and size_bytes."""
    local_dir = Path(local_dir)
    manifest = build_manifest(local_dir, step)
    rel = checkpoint_rel(step)
    for entry in manifest["files"]:
        storage.put_file(local_dir / entry["path"], f"{rel}/{entry['path']}")
    storage.put_bytes(json.dumps(manifest, indent=2).encode("utf-8"), f"{rel}/{MANIFEST}")
    return {
        "step": step,
        "uri": storage.uri(rel),
        "manifest_uri": storage.uri(f"{rel}/{MANIFEST}"),
        "size_bytes": sum(entry["size"] for entry in manifest["files"]),
    }


def publish_checkpoint_retrying(
    storage: Storage,
    local_dir: str | Path,
    step: int,
    *,
    deadline_s: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[dict | None, str]:
    """``publish_checkpoint`` again and again while the storage fails (an outage), for up to
    ``deadline_s`` seconds (``CRUCIBLE_CHECKPOINT_PUBLISH_DEADLINE_S``, default 300).

    Returns (published, "") or, once the deadline has passed, (None, why): the checkpoint is
    skipped. Skipping is clean because the manifest goes up last: whatever files of this step
    reached the storage have no manifest, so nothing ever resumes from them, and a retry that
    succeeds rewrites every file before the manifest.
    """
    if deadline_s is None:
        deadline_s = float(os.environ.get("CRUCIBLE_CHECKPOINT_PUBLISH_DEADLINE_S", "300"))
    give_up_at = time.monotonic() + deadline_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return publish_checkpoint(storage, local_dir, step), ""
        except Exception as exc:  # any storage error: boto's, a grant's HTTP, the disk's
            problem = f"{type(exc).__name__}: {exc}"[:300]
        delay = min(2.0 ** (attempt - 1), 10.0)
        if time.monotonic() + delay > give_up_at:
            log.error("checkpoint step %d not published after %d tries: %s", step, attempt, problem)
            return None, problem
        log.warning(
            "checkpoint step %d: upload failed (%s); try %d again in %.0f s",
            step,
            problem,
            attempt + 1,
            delay,
        )
        sleep(delay)


def checkpoint_steps(storage: Storage) -> list[int]:
    """Steps with anything under checkpoints/, newest first."""
    steps = set()
    for key in storage.list(f"{ROOT}/"):
        match = _STEP_DIR.match(key)
        if match:
            steps.add(int(match.group(1)))
    return sorted(steps, reverse=True)


def verify_local(local_dir: Path, manifest: dict) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    for entry in manifest.get("files", []):
        path = local_dir / entry["path"]
        if not path.is_file():
            return f"{entry['path']} is missing"
        if path.stat().st_size != entry["size"]:
            size = path.stat().st_size
            return f"{entry['path']} has {size} bytes, the manifest says {entry['size']}"
        if sha256_file(path) != entry["sha256"]:
            return f"{entry['path']} does not match its sha256"
    return None


def _read_manifest(storage: Storage, step: int) -> tuple[dict | None, str | None]:
    raw = storage.get_bytes(f"{checkpoint_rel(step)}/{MANIFEST}")
    if raw is None:
        return None, "no manifest.json (incomplete upload)"
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError:
        return None, "manifest.json is not valid JSON"
    if (
        not isinstance(manifest, dict)
        or manifest.get("step") != step
        or not isinstance(manifest.get("files"), list)
    ):
        return None, "manifest.json does not describe this checkpoint"
    if not any(entry.get("path") == "trainer_state.json" for entry in manifest["files"]):
        return None, "manifest.json lists no trainer_state.json"
    return manifest, None


def fetch_latest_complete(
    storage: Storage,
    workdir: Path,
    on_skip: Callable[[int, str], None] | None = None,
) -> tuple[int, Path, dict] | None:
    """Download the newest complete checkpoint into ``workdir``: (step, local folder, manifest)."""
    for step in checkpoint_steps(storage):
        manifest, problem = _read_manifest(storage, step)
        local = Path(workdir) / f"step-{step:06d}"
        if manifest is not None:
            shutil.rmtree(local, ignore_errors=True)
            try:
                for entry in manifest["files"]:
                    storage.get_file(
                        f"{checkpoint_rel(step)}/{entry['path']}", local / entry["path"]
                    )
            except Exception as exc:  # a missing object: the checkpoint is not complete
                problem = f"cannot download: {exc}"
            else:
                problem = verify_local(local, manifest)
            if problem is None:
                return step, local, manifest
            shutil.rmtree(local, ignore_errors=True)
        log.warning("skipping checkpoint step %d: %s", step, problem)
        if on_skip:
            on_skip(step, problem)
    return None
