"""Version locks for content files kept under version control (evaluation suites, batch
frameworks): a canonical content hash, semantic versions that only go up, and a lock file
recording each item's version, hash and history.

No Django app is imported here; an app passes in its items as ``{name: (version, sha256)}``.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")


class LockError(ValueError):
    """Content that changed without a new version, or a version that went down."""


def content_sha256(data: Any) -> str:
    """sha256 of the canonical JSON (sorted keys, no insignificant whitespace)."""
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def semver(version: str) -> tuple[int, int, int]:
    match = _SEMVER.match(version or "")
    if not match:
        raise LockError(f"not a semantic version: {version!r}")
    return tuple(int(x) for x in match.groups())  # type: ignore[return-value]


def bump_version(version: str, part: str) -> str:
    major, minor, patch = semver(version)
    if part == "major":
        return f"{major + 1}.0.0"
    if part == "minor":
        return f"{major}.{minor + 1}.0"
    if part == "patch":
        return f"{major}.{minor}.{patch + 1}"
    raise ValueError(f"unknown version part {part!r} (major, minor or patch)")


def read_lock(path: Path, section: str) -> dict:
    if not path.is_file():
        return {section: {}}
    data = json.loads(path.read_text(encoding="utf-8"))
    data.setdefault(section, {})
    return data


def check_lock(items: dict[str, tuple[str, str]], *, path: Path, section: str, hint: str) -> list:
    """Problems between the items ``{name: (version, sha256)}`` and the lock file."""
    lock = read_lock(path, section)[section]
    problems = []
    for name, (version, sha) in sorted(items.items()):
        entry = lock.get(name)
        how = hint.format(name=name)
        if entry is None:
            problems.append(f"{name!r} {version} is not in the lock file; {how}.")
        elif version == entry["version"] and sha != entry["sha256"]:
            problems.append(f"{name!r} changed but its version is still {version}; {how}.")
        elif version != entry["version"]:
            if semver(version) <= semver(entry["version"]):
                problems.append(
                    f"{name!r} version {version} is not above the locked {entry['version']}; "
                    "versions only go up."
                )
            else:
                problems.append(f"{name!r} version {version} is not recorded in the lock; {how}.")
    return problems


def write_lock(
    items: dict[str, tuple[str, str]], *, path: Path, section: str, hint: str
) -> list[str]:
    """Record every item's version and hash; refuses (LockError) changed content without a new
    version, or a version that is not above the locked one. Returns one line per item."""
    lock = read_lock(path, section)
    entries = lock[section]
    done = []
    for name, (version, sha) in sorted(items.items()):
        entry = entries.get(name)
        if entry and entry["version"] == version:
            if entry["sha256"] != sha:
                raise LockError(
                    f"{name!r} changed but its version is still {version}; "
                    + hint.format(name=name)
                )
            done.append(f"{name}: {version} unchanged")
            continue
        if entry and semver(version) <= semver(entry["version"]):
            raise LockError(
                f"{name!r} version {version} is not above the locked {entry['version']}"
            )
        history = (entry or {}).get("history", [])
        history.append(
            {
                "version": version,
                "sha256": sha,
                "locked_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )
        entries[name] = {"version": version, "sha256": sha, "history": history}
        done.append(f"{name}: locked {version}")
    path.write_text(json.dumps(lock, indent=2) + "\n", encoding="utf-8")
    return done


def locked_sha256(name: str, version: str, *, path: Path, section: str) -> str | None:
    for row in read_lock(path, section)[section].get(name, {}).get("history", []):
        if row["version"] == version:
            return row["sha256"]
    return None
