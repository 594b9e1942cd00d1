"""Streaming validation of JSONL uploads: corpora and training files.

Both read the upload line by line with a bounded ``readline`` (constant memory: a line
over the size limit is reported and skipped without being held whole), hash it as they
go, and report errors as ``{"line", "pointer", "message"}``: the first
``MAX_REPORTED_ERRORS`` of them, with the total.

The common case is fast: orjson parses the line and the compiled schema (jsonschema-rs)
says it is valid. Only a line that fails takes the slow path, which works out the
reason: a byte-order mark, invalid UTF-8, a blank line, a truncated record, bad JSON,
or the schema error that jsonschema's ``best_match`` picks, with its JSON pointer.

Training files come in the formats of ``gpu.formats`` (Crucible, OpenAI chat JSONL,
ShareGPT, Alpaca), detected from the first record; the worker reads them through the same
module, so a file accepted here trains the same way there.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import orjson

from corpora.schema_migrations import upgrader
from corpora.schemas import (
    CURRENT_CORPUS_VERSION,
    corpus_validator,
    training_file_validator,
)
from corpora.tokens import count_tokens
from gpu import formats as training_formats

MAX_REPORTED_ERRORS = 50
MAX_REPORTED_PROBLEMS = 50
MAX_LINE_BYTES = 8 * 1024 * 1024
UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")

__all__ = [
    "MAX_LINE_BYTES",
    "MAX_REPORTED_ERRORS",
    "CorpusRecord",
    "JsonlReport",
    "TrainingFileReport",
    "iter_corpus_records",
    "iter_jsonl",
    "to_messages",
    "training_file_validator",
    "validate_training_file",
]


@dataclass
class JsonlReport:
    """What reading a JSONL stream found: size, hash, lines and the errors."""

    max_line_bytes: int = MAX_LINE_BYTES
    sha256: str = ""
    size_bytes: int = 0
    lines: int = 0
    blank_lines: int = 0
    byte_order_mark: bool = False
    errors: list[dict] = field(default_factory=list)
    error_total: int = 0

    def add_error(self, line: int, pointer: str, message: str) -> None:
        self.error_total += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"line": line, "pointer": pointer, "message": message})

    @property
    def valid(self) -> bool:
        return self.error_total == 0

    def summary(self, what: str) -> str:
        first = self.errors[0]
        where = f"line {first['line']}" + (f" at {first['pointer']}" if first["pointer"] else "")
        return (
            f"The {what} is not valid: {self.error_total} error(s); first on {where}: "
            f"{first['message']}"
        )


def _explain_unparsable(raw: bytes, number: int, at_eof: bool, report: JsonlReport) -> None:
    """Report why ``raw`` (one line) did not parse, or count it as blank."""
    if number == 1 and raw.startswith(UTF16_BOMS):
        report.add_error(
            1,
            "",
            "the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8",
        )
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        report.add_error(
            number,
            "",
            f"invalid UTF-8 at byte {exc.start + 1} of the line (byte 0x{raw[exc.start]:02x}); "
            "the file must be UTF-8",
        )
        return
    if not text.strip():
        report.blank_lines += 1
        return
    if number > 1 and text.startswith("\ufeff"):
        report.add_error(number, "", "a byte-order mark in the middle of the file")
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        content = text.rstrip()
        cut_short = exc.pos >= len(content) or "Unterminated string" in exc.msg
        if cut_short and at_eof and not raw.endswith(b"\n"):
            report.add_error(
                number,
                "",
                f"truncated line: the file ends in the middle of a record ({exc.msg} at "
                f"column {exc.colno})",
            )
        elif cut_short:
            report.add_error(
                number,
                "",
                f"truncated record: the line ends before the JSON does ({exc.msg} at "
                f"column {exc.colno})",
            )
        else:
            report.add_error(number, "", f"invalid JSON ({exc.msg} at column {exc.colno})")
        return
    # Python's json accepted what orjson refused: NaN/Infinity or an integer over 64 bits.
    del value
    report.add_error(
        number, "", "invalid JSON: NaN, Infinity and integers beyond 64 bits are not allowed"
    )


def iter_jsonl(stream: IO[bytes], report: JsonlReport) -> Iterator[tuple[int, object]]:
    """Yield ``(line number, parsed value)`` for each line that is JSON.

    Blank lines are counted and skipped; a leading UTF-8 byte-order mark is dropped;
    everything else that is wrong with a line goes to ``report`` as an error.
    """
    readline = stream.readline
    digest = hashlib.sha256()
    update = digest.update
    loads = orjson.loads
    decode_error = orjson.JSONDecodeError
    limit = report.max_line_bytes
    size = 0
    number = 0
    while True:
        raw = readline(limit + 1)
        if not raw:
            break
        number += 1
        update(raw)
        size += len(raw)
        if len(raw) > limit and not raw.endswith(b"\n"):
            # Over the limit: read on to the end of the line in pieces, never whole.
            length = len(raw)
            while raw and not raw.endswith(b"\n"):
                raw = readline(1 << 20)
                update(raw)
                size += len(raw)
                length += len(raw)
            report.add_error(
                number,
                "",
                f"line is {length:,} bytes, over the limit of {limit:,} bytes per record",
            )
            continue
        if number == 1 and raw.startswith(UTF8_BOM):
            report.byte_order_mark = True
            raw = raw[3:]
        try:
            value = loads(raw)
        except decode_error:
            at_eof = not raw.endswith(b"\n")
            _explain_unparsable(raw, number, at_eof, report)
            continue
        yield number, value
    report.lines = number
    report.size_bytes = size
    report.sha256 = digest.hexdigest()


# --- Corpora ----------------------------------------------------------------------------------


@dataclass(slots=True)
class CorpusRecord:
    """A valid corpus record in the current schema, with what ingestion computes."""

    line: int
    record: dict
    sha256: str
    token_count: int
    word_count: int
    chunk_tokens: list[int]
    problem: str | None = None


def _check_chunks(record: dict) -> tuple[tuple[str, str] | None, str | None]:
    """(error, problem) of the chunks: what the schema cannot express.

    Errors (the record is refused): a repeated position, offsets outside the text or
    given alone. Problem (stored, flagged): a chunk whose text is not the text between
    its offsets.
    """
    text = record["text"]
    seen: dict[int, int] = {}
    problem = None
    for index, chunk in enumerate(record["chunks"]):
        position = chunk["position"]
        if position in seen:
            return (
                f"/chunks/{index}/position",
                f"duplicate chunk position {position} (also at /chunks/{seen[position]})",
            ), None
        seen[position] = index
        start = chunk.get("start_char")
        end = chunk.get("end_char")
        if start is None and end is None:
            continue
        if start is None or end is None:
            return (f"/chunks/{index}", "start_char and end_char go together"), None
        if not start < end <= len(text):
            return (
                f"/chunks/{index}/end_char",
                f"offsets {start}..{end} are not inside the text ({len(text)} characters)",
            ), None
        if problem is None and text[start:end] != chunk["text"]:
            problem = f"chunk {position}: its text differs from text[{start}:{end}]"
    return None, problem


def iter_corpus_records(
    stream: IO[bytes], report: JsonlReport, version: str = CURRENT_CORPUS_VERSION
) -> Iterator[CorpusRecord]:
    """Valid records of a corpus upload, upgraded to the current schema version.

    Invalid lines are reported to ``report`` and skipped: the caller decides (an upload
    writes nothing unless ``report.valid`` at the end). Duplicate ids are the caller's
    to find, since they may be in the database already.
    """
    validator = corpus_validator(version)
    is_valid = validator.is_valid
    upgrade = upgrader(version, CURRENT_CORPUS_VERSION)
    dumps = orjson.dumps
    sort_keys = orjson.OPT_SORT_KEYS
    sha256 = hashlib.sha256
    for number, record in iter_jsonl(stream, report):
        if not isinstance(record, dict):
            report.add_error(number, "", "each line must be a JSON object (a document)")
            continue
        if not is_valid(record):
            pointer, message = validator.explain(record) or ("", "invalid record")
            report.add_error(number, pointer, message)
            continue
        if upgrade is not None:
            record = upgrade(record)
        chunks = record.get("chunks", ())
        problem = None
        if chunks:
            error, problem = _check_chunks(record)
            if error is not None:
                report.add_error(number, *error)
                continue
        text = record["text"]
        yield CorpusRecord(
            line=number,
            record=record,
            sha256=sha256(dumps(record, option=sort_keys)).hexdigest(),
            token_count=count_tokens(text),
            word_count=len(text.split()),
            chunk_tokens=[
                c["token_count"] if "token_count" in c else count_tokens(c["text"]) for c in chunks
            ],
            problem=problem,
        )


# --- Training files ---------------------------------------------------------------------------


def to_messages(record: dict) -> list[dict]:
    """The chat transcript (role, content) of a valid record, in any training-file format."""
    return training_formats.to_messages(record)


@dataclass
class TrainingFileReport(JsonlReport):
    format: str | None = None  # gpu.formats key: crucible, openai_chat, sharegpt, alpaca
    derived_ids: int = 0
    conversations: int = 0
    pairs: int = 0
    words: int = 0
    tokens: int = 0
    problems: list[dict] = field(default_factory=list)
    conversation_words: list[int] = field(default_factory=list)
    conversation_tokens: list[int] = field(default_factory=list)
    quality_scores: list[float] = field(default_factory=list)
    preview: list[dict] = field(default_factory=list)

    @property
    def format_label(self) -> str:
        return training_formats.FORMATS.get(self.format or "", "")

    # The names the training app and older callers use.
    @property
    def schema_errors(self) -> list[dict]:
        return self.errors

    @property
    def schema_error_total(self) -> int:
        return self.error_total

    def stats(self) -> dict:
        words = sorted(self.conversation_words)
        tokens = sorted(self.conversation_tokens)
        quality = self.quality_scores
        return {
            "words_per_conversation": _distribution(words),
            "tokens_per_conversation": _distribution(tokens),
            "length_histogram": _histogram(tokens),
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
            "derived_ids": self.derived_ids,
        }


def _distribution(values: list[int]) -> dict:
    """min, p50, p90, max and mean of sorted ``values``."""

    def pct(p: float) -> int:
        return values[min(len(values) - 1, int(p * len(values)))] if values else 0

    return {
        "min": values[0] if values else 0,
        "p50": pct(0.5),
        "p90": pct(0.9),
        "max": values[-1] if values else 0,
        "mean": round(statistics.fmean(values), 1) if values else 0,
    }


HISTOGRAM_EDGES = (0, 64, 128, 256, 512, 1024, 2048, 4096)


def _histogram(values: list[int]) -> list[dict]:
    """Counts per length bucket (tokens), for the length-distribution chart."""
    buckets = []
    for low, high in itertools.pairwise((*HISTOGRAM_EDGES, None)):
        count = sum(1 for v in values if v >= low and (high is None or v < high))
        label = f"{low}-{high - 1}" if high is not None else f"{low}+"
        buckets.append({"bucket": label, "count": count})
    return buckets


def validate_training_file(stream: IO[bytes], version: str = "1") -> TrainingFileReport:
    """Validate a training file in any accepted format (``gpu.formats``), streaming.

    The format is detected from the first record; a record in another format is an error
    on its line. Crucible records are checked by the versioned JSON Schema, the others by
    ``gpu.formats`` (the worker's own checks), each error with its line and JSON pointer.
    """
    validator = training_file_validator(version)
    report = TrainingFileReport()
    tracker = training_formats.FormatTracker()
    seen_ids: dict[str, int] = {}
    for number, record in iter_jsonl(stream, report):
        if not isinstance(record, dict):
            report.add_error(number, "", "each line must be a JSON object")
            continue
        try:
            fmt = tracker.check(record, number)
            if fmt == training_formats.CRUCIBLE and not validator.is_valid(record):
                pointer, message = validator.explain(record) or ("", "invalid record")
                report.add_error(number, pointer, message)
                continue
            chat = training_formats.normalize(record, fmt, number)
        except training_formats.RecordError as exc:
            report.add_error(number, exc.pointer, exc.message)
            continue
        if chat.id in seen_ids:
            report.add_error(
                number,
                "/id",
                f"duplicate id '{chat.id}' (first on line {seen_ids[chat.id]})",
            )
            continue
        seen_ids[chat.id] = number
        report.derived_ids += chat.id_derived
        messages = chat.flat_messages()
        problem = training_formats.problem(chat)
        if problem and len(report.problems) < MAX_REPORTED_PROBLEMS:
            report.problems.append({"line": number, "conversation_id": chat.id, "message": problem})
        report.conversations += 1
        report.pairs += chat.trained_turns
        words = sum(len(m["content"].split()) for m in messages)
        tokens = sum(count_tokens(m["content"]) for m in messages)
        report.words += words
        report.tokens += tokens
        report.conversation_words.append(words)
        report.conversation_tokens.append(tokens)
        score = chat.metadata.get("quality_score")
        if isinstance(score, int | float) and not isinstance(score, bool):
            report.quality_scores.append(float(score))
        if len(report.preview) < 3:
            report.preview.append({"line": number, "id": chat.id, "messages": messages[:4]})
    report.format = tracker.format
    if report.conversations == 0 and report.valid:
        report.add_error(1, "", "the file holds no conversations")
    return report
