"""The versioned JSON Schemas in ``schemas/``: loading, compiling, and the catalogue.

Corpus records: ``schemas/corpus/core.v<N>.json`` plus the extension schemas in
``schemas/corpus/extensions/<name>.v<N>.json`` that the core schema references by
``$id``. Training files: ``schemas/training_file/v<N>.json``.

Each schema gets two validators: a compiled one (jsonschema-rs, Rust) that only says
valid or not, fast enough for hundreds of thousands of records a second, and the
reference Python implementation (jsonschema) that explains the rare failing record with
a JSON pointer and a readable message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jsonschema_rs
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
CORPUS_DIR = SCHEMA_DIR / "corpus"
CORPUS_VERSIONS = ("1", "2")
CURRENT_CORPUS_VERSION = "2"
TRAINING_FILE_VERSIONS = ("1",)


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@cache
def extension_schemas() -> tuple[dict, ...]:
    return tuple(_load(p) for p in sorted((CORPUS_DIR / "extensions").glob("*.json")))


def corpus_schema_path(version: str) -> Path:
    return CORPUS_DIR / f"core.v{version}.json"


def training_file_schema_path(version: str) -> Path:
    return SCHEMA_DIR / "training_file" / f"v{version}.json"


def _pointer(path) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


@dataclass(frozen=True)
class SchemaValidator:
    """Fast yes/no validation, with an explanation for the records that fail."""

    schema: dict
    fast: object
    slow: Draft202012Validator

    def is_valid(self, record) -> bool:
        return self.fast.is_valid(record)

    def explain(self, record) -> tuple[str, str] | None:
        """(JSON pointer, message) of the most relevant error, or None when valid."""
        error = best_match(self.slow.iter_errors(record))
        if error is None:
            return None
        return _pointer(error.absolute_path), _message(error)


def _message(error) -> str:
    """jsonschema's message, with what is allowed where it helps to know."""
    if error.validator != "additionalProperties" or not isinstance(error.instance, dict):
        return error.message
    schema = error.schema
    known = list(schema.get("properties", {}))
    patterns = list(schema.get("patternProperties", {}))
    extra = sorted(
        key
        for key in error.instance
        if key not in known and not any(re.search(p, key) for p in patterns)
    )
    allowed = ", ".join(known) + "".join(f", or a name matching {p}" for p in patterns)
    unexpected = ", ".join(repr(key) for key in extra)
    verb = "was" if len(extra) == 1 else "were"
    return (
        f"Additional properties are not allowed ({unexpected} {verb} unexpected); "
        f"allowed: {allowed}"
    )


def _compile(schema: dict, resources: tuple[dict, ...] = ()) -> SchemaValidator:
    Draft202012Validator.check_schema(schema)
    registry = Registry().with_resources((r["$id"], Resource.from_contents(r)) for r in resources)
    fast_registry = jsonschema_rs.Registry([(r["$id"], r) for r in resources])
    return SchemaValidator(
        schema=schema,
        fast=jsonschema_rs.validator_for(schema, registry=fast_registry),
        slow=Draft202012Validator(schema, registry=registry),
    )


def check_corpus_version(version: str) -> str:
    version = str(version).strip().removeprefix("v")
    if version not in CORPUS_VERSIONS:
        raise ValueError(
            f"unknown corpus schema version '{version}'; known versions: "
            + ", ".join(CORPUS_VERSIONS)
        )
    return version


@cache
def corpus_validator(version: str = CURRENT_CORPUS_VERSION) -> SchemaValidator:
    return _compile(_load(corpus_schema_path(version)), extension_schemas())


@cache
def training_file_validator(version: str = "1") -> SchemaValidator:
    return _compile(_load(training_file_schema_path(version)))


def catalogue() -> list[dict]:
    """Every schema in the repository: name, version, title, path and whether current."""
    entries = []
    for version in CORPUS_VERSIONS:
        schema = _load(corpus_schema_path(version))
        entries.append(
            {
                "name": "corpus",
                "version": version,
                "current": version == CURRENT_CORPUS_VERSION,
                "title": schema["title"],
                "id": schema["$id"],
                "path": str(corpus_schema_path(version).relative_to(SCHEMA_DIR.parent)),
            }
        )
    for path in sorted((CORPUS_DIR / "extensions").glob("*.json")):
        schema = _load(path)
        name, _, version = path.stem.partition(".v")
        entries.append(
            {
                "name": f"{name}-extension",
                "version": version,
                "current": True,
                "title": schema["title"],
                "id": schema["$id"],
                "path": str(path.relative_to(SCHEMA_DIR.parent)),
            }
        )
    for version in TRAINING_FILE_VERSIONS:
        path = training_file_schema_path(version)
        schema = _load(path)
        entries.append(
            {
                "name": "training-file",
                "version": version,
                "current": version == TRAINING_FILE_VERSIONS[-1],
                "title": schema["title"],
                "id": schema["$id"],
                "path": str(path.relative_to(SCHEMA_DIR.parent)),
            }
        )
    return entries


def catalogue_schema(name: str, version: str) -> dict | None:
    for entry in catalogue():
        if entry["name"] == name and entry["version"] == version:
            return _load(SCHEMA_DIR.parent / entry["path"])
    return None
