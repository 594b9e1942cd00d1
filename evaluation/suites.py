"""Versioned evaluation suites: JSON files in evaluation/suites/, JSON Schemas in
schemas/evaluation/, and a lock file recording each suite's version and content hash.

* ``load_suite(name)`` validates a suite against its schema plus the checks a schema cannot
  express (unique ids, category lists) and returns a ``Suite``; any problem raises
  ``SuiteError`` whose message starts with the file and the JSON pointer of the bad value.
* The content hash is the sha256 of the canonical JSON (sorted keys, no insignificant
  whitespace), so re-indenting a file changes nothing while any change of content does.
* ``VERSIONS.lock.json`` records, per suite, the current version and hash and the history of
  every locked version. ``check_lock`` reports a suite whose content changed while its version
  did not (or whose new version was never locked); ``manage.py suites_lock --bump`` raises the
  version and records it. A run stores ``{name: version}`` (and the hash), so an old report
  keeps the version it used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from config import versionlock

SUITES_DIR = Path(__file__).resolve().parent / "suites"
SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas" / "evaluation"
LOCK_FILE = "VERSIONS.lock.json"
SUITE_NAMES = ("knowledge_retention", "emotional_intelligence", "brand_voice")
BUMP_HINT = (
    "raise its version: `python manage.py suites_lock --bump patch {name}` (or minor/major), "
    "which rewrites the version and records it in evaluation/suites/VERSIONS.lock.json"
)


class SuiteError(ValueError):
    """An invalid suite file; ``pointer`` is the JSON pointer of the offending value."""

    def __init__(self, message: str, *, path: str | Path | None = None, pointer: str = ""):
        self.path = str(path) if path else None
        self.pointer = pointer
        where = f"{Path(path).name}" if path else "suite"
        super().__init__(f"{where} at {pointer or '/'}: {message}")


@dataclass(frozen=True)
class Suite:
    name: str
    version: str
    sha256: str
    data: dict = field(repr=False)
    items: list = field(repr=False)
    path: str = ""

    @property
    def ids(self) -> list[str]:
        return [item["id"] for item in self.items]

    def item(self, item_id: str) -> dict:
        for item in self.items:
            if item["id"] == item_id:
                return item
        raise KeyError(item_id)

    @property
    def rubric(self) -> dict:
        """The 1-5 rubric to score responses with: {"dimensions": [{key, name, description,
        anchors}]} (the persona's characteristics for brand_voice)."""
        if "rubric" in self.data:
            return self.data["rubric"]
        if "persona" in self.data:
            return {
                "scale": self.data["persona"]["scale"],
                "dimensions": self.data["persona"]["characteristics"],
            }
        return {}


content_sha256 = versionlock.content_sha256


def _pointer(parts) -> str:
    return "".join(f"/{str(p).replace('~', '~0').replace('/', '~1')}" for p in parts)


@lru_cache(maxsize=8)
def _validator(name: str):
    from jsonschema import Draft202012Validator

    path = SCHEMAS_DIR / f"{name}.json"
    if not path.is_file():
        raise SuiteError(f"no schema for suite {name!r} ({path})")
    schema = json.loads(path.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _semantic_checks(name: str, data: dict, path: Path) -> None:
    seen: dict[str, int] = {}
    for i, item in enumerate(data["items"]):
        if item["id"] in seen:
            raise SuiteError(
                f"duplicate id {item['id']!r} (also at /items/{seen[item['id']]}/id)",
                path=path,
                pointer=f"/items/{i}/id",
            )
        seen[item["id"]] = i
    if name == "knowledge_retention":
        declared = set(data["categories"])
        for i, item in enumerate(data["items"]):
            if item["category"] not in declared:
                raise SuiteError(
                    f"category {item['category']!r} is not in /categories",
                    path=path,
                    pointer=f"/items/{i}/category",
                )
    dims = data.get("rubric", {}).get("dimensions") or data.get("persona", {}).get(
        "characteristics", []
    )
    base = "/rubric/dimensions" if "rubric" in data else "/persona/characteristics"
    keys: set[str] = set()
    for i, dim in enumerate(dims):
        if dim["key"] in keys:
            raise SuiteError(f"duplicate key {dim['key']!r}", path=path, pointer=f"{base}/{i}/key")
        keys.add(dim["key"])


def parse_suite(name: str, data: Any, *, path: str | Path | None = None) -> Suite:
    """Validate already-parsed suite JSON; SuiteError with the pointer of the first problem."""
    validator = _validator(name)
    errors = sorted(validator.iter_errors(data), key=lambda e: (list(e.absolute_path), e.message))
    if errors:
        first = errors[0]
        more = f" ({len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise SuiteError(first.message + more, path=path, pointer=_pointer(first.absolute_path))
    _semantic_checks(name, data, Path(path or name))
    return Suite(
        name=name,
        version=data["version"],
        sha256=content_sha256(data),
        data=data,
        items=list(data["items"]),
        path=str(path or ""),
    )


def load_suite_file(name: str, path: str | Path) -> Suite:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SuiteError(f"suite file not found: {path}", path=path) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SuiteError(
            f"invalid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})", path=path
        ) from exc
    return parse_suite(name, data, path=path)


def load_suite(name: str, *, suites_dir: str | Path | None = None) -> Suite:
    if name not in SUITE_NAMES:
        raise SuiteError(f"unknown suite {name!r}; suites: {', '.join(SUITE_NAMES)}")
    return load_suite_file(name, Path(suites_dir or SUITES_DIR) / f"{name}.json")


def all_suites(*, suites_dir: str | Path | None = None) -> dict[str, Suite]:
    return {name: load_suite(name, suites_dir=suites_dir) for name in SUITE_NAMES}


# ------------------------------------------------------------------ version lock
# The lock rules (canonical hash, versions only go up, history) are config/versionlock.py's,
# shared with the batch frameworks and the rubrics; suites keep their file and section name.


def _lock_path(suites_dir: str | Path | None) -> Path:
    return Path(suites_dir or SUITES_DIR) / LOCK_FILE


def _items(suites_dir: str | Path | None) -> dict[str, tuple[str, str]]:
    return {n: (s.version, s.sha256) for n, s in all_suites(suites_dir=suites_dir).items()}


def read_lock(suites_dir: str | Path | None = None) -> dict:
    return versionlock.read_lock(_lock_path(suites_dir), "suites")


def check_lock(*, suites_dir: str | Path | None = None) -> list[str]:
    """Problems between the suite files and the lock (empty when everything is locked)."""
    problems = versionlock.check_lock(
        _items(suites_dir), path=_lock_path(suites_dir), section="suites", hint=BUMP_HINT
    )
    return [f"Suite {problem}" for problem in problems]


def bump_version(version: str, part: str) -> str:
    try:
        return versionlock.bump_version(version, part)
    except versionlock.LockError as exc:
        raise SuiteError(str(exc), pointer="/version") from exc


def write_lock(
    *, suites_dir: str | Path | None = None, bump: dict[str, str] | None = None
) -> list[str]:
    """Bump the named suites (rewriting their version in the file), then record every suite's
    version and hash. Refuses (SuiteError) a suite whose content changed without a new version.
    Returns what it did, one line per suite."""
    directory = Path(suites_dir or SUITES_DIR)
    done = []
    for name, part in (bump or {}).items():
        suite = load_suite(name, suites_dir=directory)
        data = dict(suite.data)
        data["version"] = bump_version(suite.version, part)
        path = directory / f"{name}.json"
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        done.append(f"{name}: version {suite.version} -> {data['version']}")
    try:
        done += versionlock.write_lock(
            _items(directory), path=_lock_path(directory), section="suites", hint=BUMP_HINT
        )
    except versionlock.LockError as exc:
        raise SuiteError(f"Suite {exc}", pointer="/version") from exc
    return done


def locked_sha256(name: str, version: str, *, suites_dir: str | Path | None = None) -> str | None:
    """The content hash a past version of a suite had (from the lock history), if recorded."""
    return versionlock.locked_sha256(name, version, path=_lock_path(suites_dir), section="suites")


def conversation_for(suite: Suite, item: dict) -> list[dict]:
    """The chat messages a model answers for an emotional_intelligence or brand_voice item: the
    suite's system prompt (the persona's for brand_voice), then the client's message. An item's
    ``context`` is for raters only and never reaches the model."""
    if suite.name == "brand_voice":
        system = suite.data["persona"]["system_prompt"]
    elif suite.name == "emotional_intelligence":
        system = suite.data.get("system_prompt")
    else:
        raise SuiteError(f"suite {suite.name!r} is scored by option log-likelihoods, not replies")
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": item["prompt"]}]
