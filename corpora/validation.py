"""Streaming validation of training files against ``schemas/training_file/v<N>.json``.

Reads line by line (constant memory), so a file of gigabytes validates like a small one.
Errors carry the 1-based line number, a JSON pointer and a message.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import statistics
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import IO

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
MAX_REPORTED_ERRORS = 50
MAX_LINE_BYTES = 8 * 1024 * 1024


@cache
def training_file_validator(version: str = "1") -> Draft202012Validator:
    path = SCHEMA_DIR / "training_file" / f"v{version}.json"
    schema = json.loads(path.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def to_messages(record: dict) -> list[dict]:
    """The chat transcript of a conversation, whichever shape the file used."""
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    messages = []
    if record.get("system_prompt"):
        messages.append({"role": "system", "content": record["system_prompt"]})
    for pair in record["training_pairs"]:
        messages.append({"role": "user", "content": pair["user_input"]})
        messages.append({"role": "assistant", "content": pair["target_response"]})
    return messages


@dataclass
class TrainingFileReport:
    sha256: str = ""
    size_bytes: int = 0
    lines: int = 0
    conversations: int = 0
    pairs: int = 0
    words: int = 0
    schema_errors: list[dict] = field(default_factory=list)
    schema_error_total: int = 0
    problems: list[dict] = field(default_factory=list)
    conversation_words: list[int] = field(default_factory=list)
    quality_scores: list[float] = field(default_factory=list)
    preview: list[dict] = field(default_factory=list)

    def add_schema_error(self, line: int, pointer: str, message: str) -> None:
        self.schema_error_total += 1
        if len(self.schema_errors) < MAX_REPORTED_ERRORS:
            self.schema_errors.append({"line": line, "pointer": pointer, "message": message})

    def stats(self) -> dict:
        words = sorted(self.conversation_words)
        quality = self.quality_scores

        def pct(p: float) -> int:
            return words[min(len(words) - 1, int(p * len(words)))] if words else 0

        return {
            "words_per_conversation": {
                "min": words[0] if words else 0,
                "p50": pct(0.5),
                "p90": pct(0.9),
                "max": words[-1] if words else 0,
                "mean": round(statistics.fmean(words), 1) if words else 0,
            },
            "pairs_per_conversation": round(self.pairs / self.conversations, 2)
            if self.conversations
            else 0,
            "quality_score": {
                "count": len(quality),
                "mean": round(statistics.fmean(quality), 3),
                "min": min(quality),
                "max": max(quality),
            }
            if quality
            else None,
            "preview": self.preview,
        }


def _pointer(path) -> str:
    return "/" + "/".join(str(p) for p in path) if path else ""


def _check_trainable(record: dict, messages: list[dict]) -> str | None:
    roles = [m["role"] for m in messages]
    if roles[-1] != "assistant":
        return "the conversation does not end with an assistant turn"
    body = [r for r in roles if r != "system"]
    if "system" in roles[1:]:
        return "a system message may only come first"
    if body and body[0] != "user":
        return "the conversation must start with a user turn (after an optional system prompt)"
    for a, b in itertools.pairwise(body):
        if a == b:
            return f"two {a} turns in a row"
    return None


def validate_training_file(stream: IO[bytes], version: str = "1") -> TrainingFileReport:
    validator = training_file_validator(version)
    report = TrainingFileReport()
    digest = hashlib.sha256()
    seen_ids: dict[str, int] = {}
    for number, raw in enumerate(stream, start=1):
        digest.update(raw)
        report.size_bytes += len(raw)
        report.lines = number
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a byte-order mark is tolerated
        if len(raw) > MAX_LINE_BYTES:
            report.add_schema_error(number, "", f"line is over {MAX_LINE_BYTES} bytes")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            report.add_schema_error(number, "", f"invalid UTF-8 at byte {exc.start}")
            continue
        if not text.strip():
            continue  # blank lines are skipped
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            report.add_schema_error(number, "", f"invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(record, dict):
            report.add_schema_error(number, "", "each line must be a JSON object")
            continue
        error = best_match(validator.iter_errors(record))
        if error is not None:
            report.add_schema_error(number, _pointer(error.absolute_path), error.message)
            continue
        if record["id"] in seen_ids:
            report.add_schema_error(
                number,
                "/id",
                f"duplicate id '{record['id']}' (first on line {seen_ids[record['id']]})",
            )
            continue
        seen_ids[record["id"]] = number
        messages = to_messages(record)
        problem = _check_trainable(record, messages)
        if problem:
            report.problems.append(
                {"line": number, "conversation_id": record["id"], "message": problem}
            )
        report.conversations += 1
        report.pairs += sum(1 for m in messages if m["role"] == "assistant")
        words = sum(len(m["content"].split()) for m in messages)
        report.words += words
        report.conversation_words.append(words)
        score = (record.get("metadata") or {}).get("quality_score")
        if isinstance(score, int | float):
            report.quality_scores.append(float(score))
        if len(report.preview) < 3:
            report.preview.append({"line": number, "id": record["id"], "messages": messages[:4]})
    report.sha256 = digest.hexdigest()
    if report.conversations == 0 and not report.schema_errors:
        report.add_schema_error(1, "", "the file holds no conversations")
    return report
