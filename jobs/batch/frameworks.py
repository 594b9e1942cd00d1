"""Analysis frameworks: JSON files in jobs/frameworks/ validated against
schemas/framework/v1.json, locked by version in jobs/frameworks/VERSIONS.lock.json (the same
machinery as the evaluation suites, config/versionlock.py), rendered into chat messages, and
answers parsed and validated against the framework's answer schema."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from config import versionlock
from jobs.batch.stats import extract_json

FRAMEWORKS_DIR = Path(__file__).resolve().parent.parent / "frameworks"
SCHEMA_PATH = Path(__file__).resolve().parent.parent.parent / "schemas" / "framework" / "v1.json"
LOCK_FILE = "VERSIONS.lock.json"
LOCK_SECTION = "frameworks"
BUMP_HINT = (
    "raise its version: `python manage.py frameworks_lock --bump patch {name}` (or minor/major)"
)
LEVELS = ("nominal", "ordinal", "interval", "ratio")


class FrameworkError(ValueError):
    """An invalid framework file, or content edited without a new version."""

    def __init__(self, message: str, *, path: str | Path | None = None, pointer: str = ""):
        self.path = str(path) if path else None
        self.pointer = pointer
        where = Path(path).name if path else "framework"
        super().__init__(f"{where} at {pointer or '/'}: {message}")


@dataclass(frozen=True)
class FrameworkSpec:
    name: str
    version: str
    sha256: str
    data: dict = field(repr=False)

    @property
    def fields(self) -> list[dict]:
        return self.data["fields"]

    @property
    def answer_schema(self) -> dict:
        return self.data["answer_schema"]

    def field(self, key: str) -> dict:
        return next(f for f in self.fields if f["key"] == key)


@lru_cache(maxsize=1)
def _file_validator():
    from jsonschema import Draft202012Validator

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _pointer(parts) -> str:
    return "".join(f"/{str(p).replace('~', '~0').replace('/', '~1')}" for p in parts)


def parse_framework(data: Any, *, path: str | Path | None = None) -> FrameworkSpec:
    """Validate parsed framework JSON (schema, then what a schema cannot say)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    errors = sorted(_file_validator().iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        raise FrameworkError(first.message, path=path, pointer=_pointer(first.absolute_path))
    answer = data["answer_schema"]
    try:
        Draft202012Validator.check_schema(answer)
    except SchemaError as exc:
        raise FrameworkError(
            f"not a JSON Schema: {exc.message}", path=path, pointer="/answer_schema"
        ) from exc
    props = answer.get("properties", {})
    required = set(answer.get("required", []))
    seen = set()
    for i, spec in enumerate(data["fields"]):
        key = spec["key"]
        where = f"/fields/{i}"
        if key in seen:
            raise FrameworkError(f"duplicate field {key!r}", path=path, pointer=f"{where}/key")
        seen.add(key)
        if key not in props or key not in required:
            raise FrameworkError(
                f"field {key!r} must be a required property of /answer_schema",
                path=path,
                pointer=f"{where}/key",
            )
        if spec["level"] == "nominal":
            if props[key].get("enum") != spec["values"]:
                raise FrameworkError(
                    "a nominal field's values must equal its enum in the answer schema",
                    path=path,
                    pointer=f"{where}/values",
                )
        else:
            low, high = spec["range"]
            if not low < high:
                raise FrameworkError("range must be [low, high]", path=path, pointer=where)
            if (props[key].get("minimum"), props[key].get("maximum")) != (low, high):
                raise FrameworkError(
                    "range must equal the answer schema's minimum and maximum",
                    path=path,
                    pointer=f"{where}/range",
                )
    try:
        render_messages(data, {"text": "x", "title": "", "author": "", "date": ""})
    except (KeyError, IndexError, ValueError) as exc:
        raise FrameworkError(f"bad template: {exc}", path=path, pointer="/prompt/user") from exc
    return FrameworkSpec(
        name=data["name"],
        version=data["version"],
        sha256=versionlock.content_sha256(data),
        data=data,
    )


def load_framework_file(path: str | Path) -> FrameworkSpec:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise FrameworkError("file not found", path=path) from exc
    except json.JSONDecodeError as exc:
        raise FrameworkError(f"invalid JSON ({exc.msg}, line {exc.lineno})", path=path) from exc
    spec = parse_framework(data, path=path)
    if spec.name != path.stem:
        raise FrameworkError(
            f"name {spec.name!r} must match the file name", path=path, pointer="/name"
        )
    return spec


def all_frameworks(directory: str | Path | None = None) -> dict[str, FrameworkSpec]:
    directory = Path(directory or FRAMEWORKS_DIR)
    return {
        p.stem: load_framework_file(p)
        for p in sorted(directory.glob("*.json"))
        if p.name != LOCK_FILE
    }


def _items(directory: Path) -> dict[str, tuple[str, str]]:
    return {n: (s.version, s.sha256) for n, s in all_frameworks(directory).items()}


def check_lock(directory: str | Path | None = None) -> list[str]:
    directory = Path(directory or FRAMEWORKS_DIR)
    return versionlock.check_lock(
        _items(directory), path=directory / LOCK_FILE, section=LOCK_SECTION, hint=BUMP_HINT
    )


def write_lock(directory: str | Path | None = None, bump: dict[str, str] | None = None) -> list:
    directory = Path(directory or FRAMEWORKS_DIR)
    done = []
    for name, part in (bump or {}).items():
        spec = load_framework_file(directory / f"{name}.json")
        data = dict(spec.data)
        data["version"] = versionlock.bump_version(spec.version, part)
        (directory / f"{name}.json").write_text(
            json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        done.append(f"{name}: version {spec.version} -> {data['version']}")
    try:
        done += versionlock.write_lock(
            _items(directory), path=directory / LOCK_FILE, section=LOCK_SECTION, hint=BUMP_HINT
        )
    except versionlock.LockError as exc:
        raise FrameworkError(str(exc)) from exc
    return done


# --- Prompts and answers ------------------------------------------------------------------------


def render_messages(data: dict, values: dict) -> list[dict]:
    """The chat messages for one text: the framework's system prompt and its user template
    filled with ``text``, ``title``, ``author`` and ``date`` (str.format: literal braces are
    doubled in the template)."""
    prompt = data["prompt"]
    return [
        {"role": "system", "content": prompt["system"]},
        {"role": "user", "content": prompt["user"].format(**values)},
    ]


_validators: dict[str, Any] = {}


def _validator(schema: dict, cls) -> Any:
    """One compiled validator per schema in each process (building one costs more than
    validating an answer; a batch validates thousands against the same few schemas)."""
    key = json.dumps(schema, sort_keys=True)
    validator = _validators.get(key)
    if validator is None:
        if len(_validators) > 256:
            _validators.clear()
        validator = _validators[key] = cls(schema)
    return validator


def validate_answer(spec_data: dict, text: str) -> tuple[Any, list[str], str]:
    """(parsed, errors, kind): kind is "" when valid, else "invalid_json" or
    "schema_violation"; errors are readable lines with the JSON pointer."""
    from jsonschema import Draft202012Validator

    try:
        parsed = extract_json(text)
    except ValueError as exc:
        return None, [str(exc)], "invalid_json"
    validator = _validator(spec_data["answer_schema"], Draft202012Validator)
    errors = [
        f"{_pointer(e.absolute_path) or '/'}: {e.message}"
        for e in sorted(validator.iter_errors(parsed), key=lambda e: list(e.absolute_path))
    ]
    return parsed, errors, ("schema_violation" if errors else "")
