"""Rubrics: JSON files under evaluation/rubrics/ kept under version control, each with a
semantic version and a scoring schema (dimensions, scales, pass thresholds), recorded in a
lock file through config/versionlock.py (content that changes without a new version is
refused), like the validation suites and the batch frameworks.

    python manage.py shell -c "from evaluation.evals import rubrics; print(rubrics.write_lock())"
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from config import versionlock

RUBRICS_DIR = Path(__file__).resolve().parents[1] / "rubrics"
LOCK_FILE = "rubrics.lock.json"
LOCK_SECTION = "rubrics"
BUMP_HINT = "raise its version in evaluation/rubrics/{name}.json, then write the lock"
METHODS = {"reference", "claims_in_contexts", "claims_unsupported", "judge"}
MEASURES = {"exact_match", "token_f1", "embedding_similarity"}


class RubricError(ValueError):
    pass


@dataclass(frozen=True)
class Rubric:
    name: str
    version: str
    sha256: str
    data: dict

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def dimensions(self) -> list[dict]:
        return self.data["dimensions"]

    @property
    def judge(self) -> dict | None:
        return self.data.get("judge")

    @property
    def uses_judge(self) -> bool:
        return any(d["method"] == "judge" for d in self.dimensions)

    def public(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "title": self.data.get("title", self.name),
            "description": self.data.get("description", ""),
            "pass_rule": self.data.get("pass_rule", "all"),
            "dimensions": self.dimensions,
            "judge": self.judge,
        }


def parse_rubric(data: dict, *, name: str) -> Rubric:
    if not isinstance(data, dict) or data.get("name") != name:
        raise RubricError(f"rubric {name}: 'name' must match the file name")
    versionlock.semver(str(data.get("version", "")))
    dims = data.get("dimensions")
    if not isinstance(dims, list) or not dims:
        raise RubricError(f"rubric {name}: 'dimensions' must be a non-empty list")
    for i, dim in enumerate(dims):
        where = f"rubric {name} /dimensions/{i}"
        if dim.get("method") not in METHODS:
            raise RubricError(f"{where}/method: one of {sorted(METHODS)}")
        scale = dim.get("scale") or {}
        if not (isinstance(scale.get("min"), int | float) and scale.get("max", 0) > scale["min"]):
            raise RubricError(f"{where}/scale: min and max numbers, max above min")
        if not 0 <= float(dim.get("pass_threshold", -1)) <= 1:
            raise RubricError(f"{where}/pass_threshold: a number in [0, 1] (normalised score)")
        if set(dim.get("measures", [])) - MEASURES:
            raise RubricError(f"{where}/measures: among {sorted(MEASURES)}")
    if any(d["method"] == "judge" for d in dims) and not data.get("judge"):
        raise RubricError(f"rubric {name}: a judge dimension needs a 'judge' block")
    return Rubric(name, data["version"], versionlock.content_sha256(data), data)


def _load_all(directory: Path) -> dict[str, Rubric]:
    out = {}
    for path in sorted(directory.glob("*.json")):
        if path.name == LOCK_FILE:
            continue
        out[path.stem] = parse_rubric(json.loads(path.read_text("utf-8")), name=path.stem)
    return out


@cache
def all_rubrics() -> dict[str, Rubric]:
    return _load_all(RUBRICS_DIR)


def rubric_get(ref: str) -> Rubric:
    """``name`` or ``name@version`` (the version must be the file's: older versions are
    recorded in the lock for audit, their content lives in git history)."""
    name, _, version = ref.partition("@")
    rubric = all_rubrics().get(name)
    if rubric is None:
        raise RubricError(f"unknown rubric {name!r}; known: {', '.join(sorted(all_rubrics()))}")
    if version and version != rubric.version:
        raise RubricError(f"rubric {name} is at version {rubric.version}, not {version}")
    return rubric


def check_lock(directory: Path | None = None) -> list[str]:
    directory = directory or RUBRICS_DIR
    items = {n: (r.version, r.sha256) for n, r in _load_all(directory).items()}
    return versionlock.check_lock(
        items, path=directory / LOCK_FILE, section=LOCK_SECTION, hint=BUMP_HINT
    )


def write_lock(directory: Path | None = None) -> list[str]:
    directory = directory or RUBRICS_DIR
    items = {n: (r.version, r.sha256) for n, r in _load_all(directory).items()}
    return versionlock.write_lock(
        items, path=directory / LOCK_FILE, section=LOCK_SECTION, hint=BUMP_HINT
    )
