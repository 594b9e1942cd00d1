"""Exports of corpora and training files: formats, splits, manifest, version, checks.

One export run writes every requested format for the same rows and the same split
assignment, into a temporary folder, then checks each file by reading it back, then
stores the files (``config.storage``) and only then is the export offered.

Layout under ``exports/<export id>/``::

    manifest.json          what, from where, how, version, changelog, row counts, checksums
    CHANGELOG.md           the changelog, for people
    lineage.jsonl          one line per source record: id, content hash, split
    json/<split>.json      a JSON array per split          (field mapping applies)
    jsonl/<split>.jsonl    one object per line per split   (field mapping applies)
    csv/<split>.csv        RFC 4180 by default; delimiter, encoding, quoting are options
    parquet/<split>.parquet
    hf/README.md           Hugging Face dataset card: configs, features, splits
    hf/data/<split>-00000-of-0000N.parquet
    openai_chat/<split>.jsonl  training files only: OpenAI chat fine-tuning JSONL, one
                           {"messages": [...], "tools": [...]} per line (weight 0 kept)

Splits are seeded and stratified (``_assign_splits``); chunks follow their document so
no document leaks across splits. Versions are semantic (``_next_version``).

Memory: rows stream from the database (or the stored training file) to the writers; what
grows with the source is one (id, stratum, content hash) per record, for the split
assignment and the lineage (about 150 bytes a record).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import math
import random
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from django.utils import timezone

from config.errors import InvalidInput
from config.storage import storage_open, storage_save, storage_size
from corpora.ingest import DOCUMENT_COLUMNS
from corpora.models import Chunk, Document, Export
from corpora.tokens import count_tokens
from gpu import formats as training_formats

FORMATS = ("json", "jsonl", "csv", "parquet", "hf", "openai_chat")
# Formats that only a unit of this kind can be written in.
FORMAT_UNITS = {"openai_chat": ("conversations",)}
SPLITS = ("train", "validation", "test")
DEFAULT_SPLITS = {"train": 0.8, "validation": 0.15, "test": 0.05}
CSV_DELIMITERS = {",": ",", ";": ";", "\\t": "\t", "\t": "\t", "|": "|"}
CSV_ENCODINGS = ("utf-8", "utf-8-sig", "utf-16")
CSV_QUOTING = {"minimal": csv.QUOTE_MINIMAL, "all": csv.QUOTE_ALL}
CSV_TERMINATORS = {"crlf": "\r\n", "lf": "\n"}
ROWS_PER_SHARD = 250_000
PARQUET_BATCH = 2000
MANIFEST_VERSION = 1
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")

# Features of each unit, in column order: name -> type. "json" is an object (kept as is
# in JSON/JSONL, a compact JSON string in CSV/Parquet/HF); "messages" is a chat
# transcript, a list of {role, content} (a JSON string in CSV).
FEATURES: dict[str, dict[str, str]] = {
    "documents": {
        "id": "string",
        "title": "string",
        "text": "string",
        "document_type": "string",
        "author": "string",
        "date": "string",
        "language": "string",
        "source": "json",
        "metadata": "json",
        "extensions": "json",
        "char_count": "int64",
        "word_count": "int64",
        "token_count": "int64",
        "chunk_count": "int64",
        "sha256": "string",
    },
    "chunks": {
        "id": "string",
        "document_id": "string",
        "position": "int64",
        "text": "string",
        "token_count": "int64",
        "char_count": "int64",
        "metadata": "json",
        "document_type": "string",
        "language": "string",
    },
    "conversations": {
        "id": "string",
        "messages": "messages",
        "metadata": "json",
        "pair_count": "int64",
        "word_count": "int64",
        "token_count": "int64",
        "quality_score": "float64",
    },
}
UNITS_OF = {"corpus": ("documents", "chunks"), "training_file": ("conversations",)}
OPENAI_RECORD = "_openai_record"


def _invalid(field_name: str, message: str) -> InvalidInput:
    return InvalidInput(
        f"{field_name}: {message}", details={"fields": [{"field": field_name, "message": message}]}
    )


def check_parameters(
    *,
    source_kind: str,
    formats: list[str],
    unit: str | None,
    splits: dict[str, float] | None,
    seed: int,
    stratify_by: str | None,
    field_mapping: dict[str, str] | None,
    csv_options: dict | None,
    name: str,
) -> dict:
    """Normalised export parameters, or InvalidInput naming the bad field."""
    formats = list(dict.fromkeys(f.strip().lower() for f in formats or ()))
    if not formats:
        raise _invalid("formats", f"choose at least one of {', '.join(FORMATS)}")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise _invalid(
            "formats", f"unknown format(s) {', '.join(unknown)}; known: {', '.join(FORMATS)}"
        )
    units = UNITS_OF[source_kind]
    unit = unit or units[0]
    if unit not in units:
        raise _invalid("unit", f"a {source_kind.replace('_', ' ')} exports {' or '.join(units)}")
    for fmt in formats:
        if fmt in FORMAT_UNITS and unit not in FORMAT_UNITS[fmt]:
            raise _invalid(
                "formats",
                f"{fmt} writes {' or '.join(FORMAT_UNITS[fmt])}: export a training file for it",
            )
    ratios = dict(DEFAULT_SPLITS if splits is None else splits)
    bad = [k for k in ratios if k not in SPLITS]
    if bad:
        raise _invalid("splits", f"unknown split(s) {', '.join(bad)}; use {', '.join(SPLITS)}")
    if any(not isinstance(v, int | float) or v < 0 or v > 1 for v in ratios.values()):
        raise _invalid("splits", "each ratio is a number between 0 and 1")
    if abs(sum(ratios.values()) - 1) > 1e-6:
        raise _invalid("splits", f"the ratios add up to {sum(ratios.values()):g}, not 1")
    if ratios.get("train", 0) <= 0:
        raise _invalid("splits", "the train split needs a ratio above 0")
    ratios = {k: float(ratios.get(k, 0.0)) for k in SPLITS}
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise _invalid("seed", "an integer from 0 to 4294967295")
    features = FEATURES[unit]
    if stratify_by:
        stratify_by = stratify_by.strip()
        if not PATH.match(stratify_by) or (
            stratify_by not in features and stratify_by.split(".")[0] not in _NESTED[unit]
        ):
            raise _invalid(
                "stratify_by",
                f"'{stratify_by}' is not a field of {unit}: use one of "
                f"{', '.join(k for k, t in features.items() if t == 'string')} or "
                f"{' / '.join(p + '.<key>' for p in _NESTED[unit])}",
            )
    mapping = dict(field_mapping or {})
    for out, src in mapping.items():
        if not FIELD_NAME.match(str(out)):
            raise _invalid("field_mapping", f"'{out}' is not a valid output field name")
        if not isinstance(src, str) or not PATH.match(src):
            raise _invalid("field_mapping", f"'{src}' is not a field path")
        if src not in features and src.split(".")[0] not in _NESTED[unit]:
            raise _invalid(
                "field_mapping",
                f"'{src}' is not a field of {unit}; fields: {', '.join(features)}",
            )
    options = {
        "delimiter": ",",
        "encoding": "utf-8",
        "quoting": "minimal",
        "line_terminator": "crlf",
        "escape_formulas": False,
    }
    for key, value in (csv_options or {}).items():
        if key not in options:
            raise _invalid("csv", f"unknown option '{key}'; options: {', '.join(options)}")
        options[key] = value
    if options["delimiter"] not in CSV_DELIMITERS:
        raise _invalid("csv.delimiter", "one of , ; | or \\t (tab)")
    options["delimiter"] = CSV_DELIMITERS[options["delimiter"]]
    if options["encoding"] not in CSV_ENCODINGS:
        raise _invalid("csv.encoding", f"one of {', '.join(CSV_ENCODINGS)}")
    if options["quoting"] not in CSV_QUOTING:
        raise _invalid("csv.quoting", "minimal or all")
    if options["line_terminator"] not in CSV_TERMINATORS:
        raise _invalid("csv.line_terminator", "crlf or lf")
    options["escape_formulas"] = bool(options["escape_formulas"])
    name = (name or "dataset").strip()[:200]
    return {
        "formats": formats,
        "unit": unit,
        "name": name,
        "splits": ratios,
        "seed": seed,
        "stratify_by": stratify_by or None,
        # Pairs, not an object: PostgreSQL's jsonb would reorder the keys, and the order of
        # the output columns is the order the user gave.
        "field_mapping": [[out, src] for out, src in mapping.items()],
        "csv": options,
    }


_NESTED = {
    "documents": ("metadata", "extensions", "source"),
    "chunks": ("metadata",),
    "conversations": ("metadata",),
}


# --- Rows -------------------------------------------------------------------------------------


def _get(row: dict, path: str):
    value = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _stratum(value) -> str:
    if value is None or value == "":
        return "(none)"
    if isinstance(value, str):
        return value
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


@dataclass
class Source:
    """Where rows come from: keys and strata first (pass 1), then rows (pass 2)."""

    export: Export

    @property
    def total(self) -> int:
        raise NotImplementedError

    def keys(self, stratify_by: str | None) -> Iterator[tuple[str, str, str]]:
        """(split key, stratum, content hash) of every split unit."""
        raise NotImplementedError

    def rows(self) -> Iterator[tuple[str, dict]]:
        """(split key, natural row) in a stable order."""
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


class CorpusSource(Source):
    # The stored document columns, less the bookkeeping of the upload that wrote them.
    DOCUMENT_FIELDS = tuple(
        c for c in DOCUMENT_COLUMNS if c not in ("corpus", "ingestion", "position", "line_number")
    )

    @property
    def corpus(self):
        return self.export.corpus

    @property
    def total(self) -> int:
        if self.export.unit == Export.Unit.CHUNKS:
            return Chunk.objects.filter(corpus=self.corpus).count()
        return Document.objects.filter(corpus=self.corpus).count()

    def keys(self, stratify_by):
        documents = Document.objects.filter(corpus=self.corpus).order_by("position")
        root = (stratify_by or "").split(".")[0]
        if not stratify_by:
            rows = documents.values_list("external_id", "sha256").iterator(chunk_size=5000)
            for key, sha in rows:
                yield key, "(none)", sha
            return
        column = root if root in ("metadata", "extensions", "source") else stratify_by
        rows = documents.values_list("external_id", "sha256", column).iterator(chunk_size=5000)
        for key, sha, value in rows:
            if root in ("metadata", "extensions", "source"):
                value = _get({root: value}, stratify_by)
            yield key, _stratum(value), sha

    def rows(self):
        if self.export.unit == Export.Unit.CHUNKS:
            chunks = (
                Chunk.objects.filter(corpus=self.corpus)
                .order_by("document__position", "position")
                .values_list(
                    "document__external_id",
                    "position",
                    "text",
                    "token_count",
                    "char_count",
                    "metadata",
                    "document__document_type",
                    "document__language",
                )
                .iterator(chunk_size=2000)
            )
            for doc_id, position, text, tokens, chars, metadata, doc_type, language in chunks:
                yield (
                    doc_id,
                    {
                        "id": f"{doc_id}#{position}",
                        "document_id": doc_id,
                        "position": position,
                        "text": text,
                        "token_count": tokens,
                        "char_count": chars,
                        "metadata": metadata,
                        "document_type": doc_type,
                        "language": language,
                    },
                )
            return
        documents = (
            Document.objects.filter(corpus=self.corpus)
            .order_by("position")
            .values_list(*self.DOCUMENT_FIELDS)
            .iterator(chunk_size=2000)
        )
        names = ("id", *self.DOCUMENT_FIELDS[1:])
        for values in documents:
            row = dict(zip(names, values, strict=True))
            yield row["id"], row

    def describe(self) -> dict:
        corpus = self.corpus
        return {
            "kind": "corpus",
            "id": str(corpus.pk),
            "name": corpus.name,
            "schema_version": corpus.schema_version,
            "checksum": corpus.checksum,
            "documents": corpus.record_count,
            "chunks": corpus.chunk_count,
        }


class TrainingFileSource(Source):
    @property
    def training_file(self):
        return self.export.training_file

    @property
    def total(self) -> int:
        return self.training_file.conversation_count

    def _records(self) -> Iterator[tuple[dict, training_formats.Chat]]:
        """(record as written, the same conversation normalised) for each line of the file,
        whatever its format (the ids of records without one derived as on upload)."""
        fmt = self.training_file.format or training_formats.CRUCIBLE
        with storage_open(self.training_file.storage_path) as handle:
            for number, raw in enumerate(handle, start=1):
                if raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if raw.strip():
                    record = orjson.loads(raw)
                    yield record, training_formats.normalize(record, fmt, number)

    def keys(self, stratify_by):
        for record, chat in self._records():
            sha = hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest()
            stratum = _stratum(_get(record, stratify_by)) if stratify_by else "(none)"
            yield chat.id, stratum, sha

    def rows(self):
        for _record, chat in self._records():
            messages = chat.flat_messages()
            metadata = chat.metadata
            score = metadata.get("quality_score")
            yield (
                chat.id,
                {
                    "id": chat.id,
                    "messages": messages,
                    "metadata": metadata,
                    "pair_count": sum(1 for m in messages if m["role"] == "assistant"),
                    "word_count": sum(len(m["content"].split()) for m in messages),
                    "token_count": sum(count_tokens(m["content"]) for m in messages),
                    "quality_score": float(score) if isinstance(score, int | float) else None,
                    # Not a feature: what the openai_chat writer writes (weights, tool calls).
                    OPENAI_RECORD: chat.openai_record(),
                },
            )

    def describe(self) -> dict:
        training_file = self.training_file
        return {
            "kind": "training_file",
            "id": str(training_file.pk),
            "name": training_file.name,
            "schema_version": training_file.schema_version,
            "checksum": training_file.sha256,
            "conversations": training_file.conversation_count,
        }


def source_for(export: Export) -> Source:
    return CorpusSource(export) if export.corpus_id else TrainingFileSource(export)


# --- Splits -----------------------------------------------------------------------------------


def _allocate(n: int, ratios: dict[str, float], carry: dict[str, float]) -> dict[str, int]:
    """Largest-remainder allocation of ``n`` items, carrying remainders across strata."""
    ideal = {s: n * ratios[s] + carry[s] for s in SPLITS}
    counts = {s: max(0, math.floor(ideal[s])) for s in SPLITS}
    left = n - sum(counts.values())
    by_remainder = sorted(SPLITS, key=lambda s: (-(ideal[s] - counts[s]), SPLITS.index(s)))
    for s in itertools.islice(itertools.cycle(by_remainder), max(left, 0)):
        counts[s] += 1
    while sum(counts.values()) > n:  # carries can overshoot on tiny strata
        s = max(SPLITS, key=lambda s: counts[s] - ideal[s])
        counts[s] -= 1
    for s in SPLITS:
        carry[s] = ideal[s] - counts[s] if ratios[s] > 0 else 0.0
    return counts


def _assign_splits(
    keyed: list[tuple[str, str]], ratios: dict[str, float], seed: int
) -> dict[str, str]:
    """Split key -> split name: seeded shuffle within each stratum, proportional counts.

    Deterministic: the same keys, strata, ratios and seed give the same assignment
    whatever the input order.
    """
    strata: dict[str, list[str]] = defaultdict(list)
    for key, stratum in keyed:
        strata[stratum].append(key)
    carry = dict.fromkeys(SPLITS, 0.0)
    assignment: dict[str, str] = {}
    for stratum in sorted(strata):
        keys = sorted(strata[stratum])
        random.Random(f"{seed}/{stratum}").shuffle(keys)
        counts = _allocate(len(keys), ratios, carry)
        start = 0
        for split in SPLITS:
            for key in keys[start : start + counts[split]]:
                assignment[key] = split
            start += counts[split]
    return assignment


# --- Writers ----------------------------------------------------------------------------------


def _json_text(value) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def tabular(row: dict, features: dict[str, str]) -> dict:
    """A natural row as a flat record: objects become JSON strings."""
    out = {}
    for name, kind in features.items():
        value = row.get(name)
        if kind == "json":
            value = _json_text(value if value is not None else {})
        out[name] = value
    return out


def _mapping(params: dict) -> dict[str, str]:
    return dict(params.get("field_mapping") or [])


def _mapped(row: dict, mapping: dict[str, str], features: dict[str, str]) -> dict:
    if not mapping:
        return {name: row.get(name) for name in features}
    return {out: _get(row, src) for out, src in mapping.items()}


@dataclass
class WrittenFile:
    path: str
    format: str
    split: str | None
    rows: int = 0
    bytes: int = 0
    sha256: str = ""


class Writer:
    fmt = ""

    def __init__(self, root: Path, features: dict[str, str], params: dict, counts: dict) -> None:
        self.root = root
        self.features = features
        self.params = params
        self.counts = counts
        self.files: dict[str, WrittenFile] = {}

    def _file(self, split: str, relative: str) -> WrittenFile:
        if split not in self.files:
            (self.root / relative).parent.mkdir(parents=True, exist_ok=True)
            self.files[split] = WrittenFile(path=relative, format=self.fmt, split=split)
        return self.files[split]

    def write(self, split: str, row: dict) -> None:
        raise NotImplementedError

    def close(self) -> list[WrittenFile]:
        return list(self.files.values())


class JsonlWriter(Writer):
    fmt = "jsonl"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.handles = {}

    def write(self, split, row):
        info = self._file(split, f"jsonl/{split}.jsonl")
        if split not in self.handles:
            self.handles[split] = (self.root / info.path).open("wb")
        self.handles[split].write(
            orjson.dumps(_mapped(row, _mapping(self.params), self.features)) + b"\n"
        )
        info.rows += 1

    def close(self):
        for handle in self.handles.values():
            handle.close()
        return super().close()


class JsonWriter(Writer):
    """A JSON array per split, one element per line (so it can be checked line by line)."""

    fmt = "json"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.handles = {}

    def write(self, split, row):
        info = self._file(split, f"json/{split}.json")
        if split not in self.handles:
            self.handles[split] = (self.root / info.path).open("wb")
            self.handles[split].write(b"[\n")
        else:
            self.handles[split].write(b",\n")
        self.handles[split].write(orjson.dumps(_mapped(row, _mapping(self.params), self.features)))
        info.rows += 1

    def close(self):
        for handle in self.handles.values():
            handle.write(b"\n]\n")
            handle.close()
        return super().close()


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class CsvWriter(Writer):
    fmt = "csv"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.handles = {}
        self.writers = {}
        options = self.params["csv"]
        self.dialect = {
            "delimiter": options["delimiter"],
            "quoting": CSV_QUOTING[options["quoting"]],
            "lineterminator": CSV_TERMINATORS[options["line_terminator"]],
            "doublequote": True,
            "quotechar": '"',
        }
        self.escape = options["escape_formulas"]

    def _cell(self, value, kind):
        if value is None:
            return ""
        if kind in ("json", "messages"):
            value = _json_text(value)
        if self.escape and isinstance(value, str) and value.startswith(FORMULA_START):
            return "'" + value
        return value

    def write(self, split, row):
        info = self._file(split, f"csv/{split}.csv")
        if split not in self.writers:
            handle = (self.root / info.path).open(
                "w", encoding=self.params["csv"]["encoding"], newline=""
            )
            self.handles[split] = handle
            self.writers[split] = csv.writer(handle, **self.dialect)
            self.writers[split].writerow(list(self.features))
        self.writers[split].writerow(
            [self._cell(row.get(name), kind) for name, kind in self.features.items()]
        )
        info.rows += 1

    def close(self):
        for handle in self.handles.values():
            handle.close()
        return super().close()


def arrow_schema(features: dict[str, str]) -> pa.Schema:
    types = {
        "string": pa.string(),
        "json": pa.string(),
        "int64": pa.int64(),
        "float64": pa.float64(),
        "messages": pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])),
    }
    return pa.schema([(name, types[kind]) for name, kind in features.items()])


class ParquetWriter(Writer):
    """Parquet per split, in shards of ``ROWS_PER_SHARD`` rows for the HF layout."""

    fmt = "parquet"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.schema = arrow_schema(self.features)
        self.buffers: dict[str, list[dict]] = defaultdict(list)
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.written: dict[str, int] = defaultdict(int)
        self.shard_files: list[WrittenFile] = []

    def relative(self, split: str, shard: int, shards: int) -> str:
        return f"parquet/{split}.parquet"

    def shards(self, split: str) -> int:
        return 1

    def _rotate(self, split: str) -> None:
        shards = self.shards(split)
        shard = self.written[split] // ROWS_PER_SHARD if shards > 1 else 0
        relative = self.relative(split, shard, shards)
        current = self.files.get(split)
        if current is not None and current.path == relative:
            return
        if split in self.writers:
            self.writers.pop(split).close()
        (self.root / relative).parent.mkdir(parents=True, exist_ok=True)
        info = WrittenFile(path=relative, format=self.fmt, split=split)
        self.files[split] = info
        self.shard_files.append(info)
        self.writers[split] = pq.ParquetWriter(
            self.root / relative, self.schema, compression="zstd", write_statistics=True
        )

    def _flush(self, split: str) -> None:
        rows = self.buffers.pop(split, [])
        if not rows:
            return
        table = pa.Table.from_pylist(rows, schema=self.schema)
        self.writers[split].write_table(table, row_group_size=PARQUET_BATCH * 5)
        self.files[split].rows += len(rows)

    def write(self, split, row):
        self._rotate(split)
        self.buffers[split].append(tabular(row, self.features))
        self.written[split] += 1
        at_shard_end = self.shards(split) > 1 and self.written[split] % ROWS_PER_SHARD == 0
        if len(self.buffers[split]) >= PARQUET_BATCH or at_shard_end:
            self._flush(split)

    def close(self):
        for split in list(self.buffers):
            self._flush(split)
        for writer in self.writers.values():
            writer.close()
        return self.shard_files


class HuggingFaceWriter(ParquetWriter):
    fmt = "hf"

    def shards(self, split):
        return max(1, math.ceil(self.counts.get(split, 0) / ROWS_PER_SHARD))

    def relative(self, split, shard, shards):
        return f"hf/data/{split}-{shard:05d}-of-{shards:05d}.parquet"


class OpenAIChatWriter(Writer):
    """OpenAI chat fine-tuning JSONL: ``{"messages": [...]}`` (and ``tools``) per line.

    Assistant messages that were context only keep ``"weight": 0``; the field mapping does
    not apply (the format is fixed).
    """

    fmt = "openai_chat"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.handles = {}

    def write(self, split, row):
        info = self._file(split, f"openai_chat/{split}.jsonl")
        if split not in self.handles:
            self.handles[split] = (self.root / info.path).open("wb")
        self.handles[split].write(orjson.dumps(row[OPENAI_RECORD]) + b"\n")
        info.rows += 1

    def close(self):
        for handle in self.handles.values():
            handle.close()
        return super().close()


WRITERS = {
    "json": JsonWriter,
    "jsonl": JsonlWriter,
    "csv": CsvWriter,
    "parquet": ParquetWriter,
    "hf": HuggingFaceWriter,
    "openai_chat": OpenAIChatWriter,
}


# --- Dataset card, manifest, versions ---------------------------------------------------------


def hf_features(features: dict[str, str]) -> list[dict]:
    out = []
    for name, kind in features.items():
        if kind == "messages":
            out.append(
                {
                    "name": name,
                    "list": [
                        {"name": "role", "dtype": "string"},
                        {"name": "content", "dtype": "string"},
                    ],
                }
            )
        else:
            out.append({"name": name, "dtype": "string" if kind == "json" else kind})
    return out


def dataset_card(*, manifest: dict, files: list[WrittenFile], features: dict[str, str]) -> str:
    splits = [s for s in SPLITS if manifest["splits"][s]["rows"]]
    hf_files = [f for f in files if f.format == "hf"]
    front = {
        "pretty_name": manifest["dataset"]["name"],
        "tags": ["crucible"],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": s, "path": f"data/{s}-*"} for s in splits],
            }
        ],
        "dataset_info": {
            "config_name": "default",
            "features": hf_features(features),
            "splits": [
                {
                    "name": s,
                    "num_examples": manifest["splits"][s]["rows"],
                    "num_bytes": sum(f.bytes for f in hf_files if f.split == s),
                }
                for s in splits
            ],
        },
    }
    languages = manifest["source"].get("languages") or []
    if languages:
        front["language"] = languages
    source = manifest["source"]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(),
        "---",
        "",
        f"# {manifest['dataset']['name']}",
        "",
        f"Version **{manifest['dataset']['version']}** of this dataset, exported by Crucible "
        f"from the {source['kind'].replace('_', ' ')} *{source['name']}* "
        f"(checksum `{source['checksum'][:16]}…`).",
        "",
        "## Splits",
        "",
        "| split | rows |",
        "|---|---|",
        *[f"| {s} | {manifest['splits'][s]['rows']} |" for s in SPLITS],
        "",
        f"Seeded ({manifest['parameters']['seed']}) and stratified by "
        f"`{manifest['parameters']['stratify_by'] or 'nothing'}`; ratios "
        + ", ".join(f"{s} {manifest['parameters']['splits'][s]:.0%}" for s in SPLITS)
        + ".",
        "",
        "## Features",
        "",
        *[
            f"- `{name}`: {kind if kind != 'json' else 'string (JSON object)'}"
            for name, kind in features.items()
        ],
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset",
        'dataset = load_dataset("path/to/this/folder")',
        "```",
        "",
        "## Changelog",
        "",
        *[
            f"- **{entry['version']}** ({entry['date']}): " + "; ".join(entry["changes"])
            for entry in manifest["changelog"]
        ],
        "",
    ]
    return "\n".join(lines)


def _bump(version: str, part: str) -> str:
    major, minor, patch = (int(x) for x in version.split("."))
    if part == "major":
        return f"{major + 1}.0.0"
    if part == "minor":
        return f"{major}.{minor + 1}.0"
    return f"{major}.{minor}.{patch + 1}"


def _read_lineage(export: Export) -> dict[str, str]:
    path = f"{export.storage_prefix}/lineage.jsonl"
    found: dict[str, str] = {}
    with storage_open(path) as handle:
        for raw in handle:
            entry = orjson.loads(raw)
            found[entry["id"]] = entry["sha256"]
    return found


def _next_version(
    *,
    previous: Export | None,
    lineage: list[tuple[str, str, str]],
    features: dict[str, str],
    split_parameters: dict,
    fingerprint: str,
    unit_label: str,
    counts: dict[str, int],
) -> tuple[str, list[dict]]:
    """The semantic version and changelog of this export.

    * unchanged content and parameters: the previous version and changelog;
    * MAJOR: the features (columns) changed, or records were removed;
    * MINOR: records were added, or the split parameters changed;
    * PATCH: only the content of existing records changed.
    """
    today = timezone.now().date().isoformat()
    if previous is None:
        entry = {
            "version": "1.0.0",
            "date": today,
            "changes": [
                f"Initial export: {len(lineage):,} {unit_label} "
                f"(train {counts['train']:,}, validation {counts['validation']:,}, "
                f"test {counts['test']:,})"
            ],
        }
        return "1.0.0", [entry]
    if previous.content_fingerprint == fingerprint:
        return previous.version, previous.changelog
    old = _read_lineage(previous)
    added = changed = 0
    for key, _stratum, sha in lineage:
        before = old.pop(key, None)
        if before is None:
            added += 1
        elif before != sha:
            changed += 1
    removed = len(old)
    changes, part = [], "patch"
    previous_features = previous.manifest.get("features", {})
    if previous_features != features:
        changes.append("features changed")
        part = "major"
    if removed:
        changes.append(f"{removed:,} {unit_label} removed")
        part = "major"
    if added:
        changes.append(f"{added:,} {unit_label} added")
        part = "minor" if part == "patch" else part
    previous_split = previous.manifest.get("parameters", {})
    if any(previous_split.get(k) != v for k, v in split_parameters.items()):
        changes.append(
            "split parameters changed ("
            + ", ".join(
                f"{k}: {previous_split.get(k)!r} → {v!r}"
                for k, v in split_parameters.items()
                if previous_split.get(k) != v
            )
            + ")"
        )
        part = "minor" if part == "patch" else part
    if changed:
        changes.append(f"{changed:,} {unit_label} changed")
    if not changes:
        changes.append("content unchanged; output options changed")
    version = _bump(previous.version, part)
    entry = {
        "version": version,
        "date": today,
        "changes": [
            *changes,
            f"now {len(lineage):,} {unit_label} (train {counts['train']:,}, validation "
            f"{counts['validation']:,}, test {counts['test']:,})",
        ],
    }
    return version, [entry, *previous.changelog]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- Checks after writing ---------------------------------------------------------------------


class ExportCheckFailed(Exception):
    pass


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ExportCheckFailed(message)


def check_file(root: Path, info: WrittenFile, features: dict[str, str], params: dict) -> None:
    """Read a written file back and check it against what was meant to be in it."""
    path = root / info.path
    _expect(path.exists(), f"{info.path} is missing")
    mapping = _mapping(params)
    keys = list(mapping) if mapping else list(features)
    if info.format == "openai_chat":
        # Read back as an upload would: every line must be a valid OpenAI chat record.
        rows = 0
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                value = orjson.loads(raw)
                fmt = training_formats.detect_format(value)
                _expect(fmt == training_formats.OPENAI_CHAT, f"{info.path}: line {number}")
                try:
                    training_formats.normalize(value, fmt, number)
                except training_formats.RecordError as exc:
                    raise ExportCheckFailed(
                        f"{info.path}: line {number} at {exc.pointer}: {exc.message}"
                    ) from exc
                rows += 1
        _expect(rows == info.rows, f"{info.path}: {rows} rows, expected {info.rows}")
    elif info.format == "jsonl":
        rows = 0
        with path.open("rb") as handle:
            for raw in handle:
                value = orjson.loads(raw)
                _expect(isinstance(value, dict), f"{info.path}: a line is not an object")
                _expect(list(value) == keys, f"{info.path}: fields differ from the mapping")
                rows += 1
        _expect(rows == info.rows, f"{info.path}: {rows} rows, expected {info.rows}")
    elif info.format == "json":
        rows = 0
        with path.open("rb") as handle:
            _expect(handle.readline() == b"[\n", f"{info.path}: not a JSON array")
            for raw in handle:
                if raw == b"]\n":
                    break
                value = orjson.loads(raw.rstrip(b",\n"))
                _expect(list(value) == keys, f"{info.path}: fields differ from the mapping")
                rows += 1
        _expect(rows == info.rows, f"{info.path}: {rows} rows, expected {info.rows}")
    elif info.format == "csv":
        options = params["csv"]
        with path.open(encoding=options["encoding"], newline="") as handle:
            reader = csv.reader(handle, delimiter=options["delimiter"])
            header = next(reader)
            _expect(header == list(features), f"{info.path}: unexpected header {header}")
            rows = 0
            for record in reader:
                _expect(len(record) == len(header), f"{info.path}: row {rows + 1} is ragged")
                rows += 1
        _expect(rows == info.rows, f"{info.path}: {rows} rows, expected {info.rows}")
    elif info.format in ("parquet", "hf"):
        metadata = pq.read_metadata(path)
        _expect(metadata.num_rows == info.rows, f"{info.path}: {metadata.num_rows} rows")
        schema = pq.read_schema(path)
        _expect(schema.names == list(features), f"{info.path}: columns {schema.names}")


def check_card(root: Path, files: list[WrittenFile], counts: dict[str, int]) -> None:
    text = (root / "hf" / "README.md").read_text(encoding="utf-8")
    _expect(text.startswith("---\n"), "hf/README.md has no YAML front matter")
    front = yaml.safe_load(text.split("---\n")[1])
    data_files = front["configs"][0]["data_files"]
    for entry in data_files:
        split = entry["split"]
        shards = [f for f in files if f.format == "hf" and f.split == split]
        _expect(bool(shards), f"hf: no data file for split {split}")
        _expect(sum(f.rows for f in shards) == counts[split], f"hf: row count of {split} differs")


# --- The run ----------------------------------------------------------------------------------


@dataclass
class Progress:
    export: Export
    total: int
    done: int = 0
    last: float = field(default=-1.0)

    def step(self, message: str, fraction: float | None = None) -> None:
        value = fraction if fraction is not None else 0.05 + 0.8 * self.done / max(self.total, 1)
        if fraction is None and value - self.last < 0.02:
            return
        self.last = value
        Export.objects.filter(pk=self.export.pk).update(
            progress=round(min(value, 1.0), 4), progress_message=message[:200]
        )


def run(export: Export) -> None:
    """Write, check, version and store every format of ``export`` (status RUNNING)."""
    params = dict(export.parameters)
    features = FEATURES[export.unit]
    source = source_for(export)
    progress = Progress(export, total=source.total)
    progress.step("Assigning splits", 0.01)

    key_rows = list(source.keys(params["stratify_by"]))
    assignment = _assign_splits([(k, s) for k, s, _ in key_rows], params["splits"], params["seed"])
    lineage = sorted(key_rows)
    split_units = {s: 0 for s in SPLITS}
    for key, _, _ in key_rows:
        split_units[assignment[key]] += 1
    del key_rows

    root = Path(tempfile.mkdtemp(prefix="crucible-export-"))
    try:
        # Pass 2: rows, routed to their split in every format.
        row_counts = {s: 0 for s in SPLITS}
        if export.unit == Export.Unit.CHUNKS:
            per_split = defaultdict(int)
            for key, count in (
                Document.objects.filter(corpus=export.corpus)
                .values_list("external_id", "chunk_count")
                .iterator(chunk_size=5000)
            ):
                per_split[assignment[key]] += count
            expected = dict(per_split)
        else:
            expected = dict(split_units)
        writers = [WRITERS[fmt](root, features, params, expected) for fmt in export.formats]
        for key, row in source.rows():
            split = assignment[key]
            for writer in writers:
                writer.write(split, row)
            row_counts[split] += 1
            progress.done += 1
            progress.step(f"Writing rows ({progress.done:,} of {progress.total:,})")
        files: list[WrittenFile] = []
        for writer in writers:
            files.extend(writer.close())

        progress.step("Checking the files", 0.86)
        for info in files:
            check_file(root, info, features, params)
            info.bytes = (root / info.path).stat().st_size
            info.sha256 = _sha256_file(root / info.path)

        unit_label = "conversations" if export.unit == Export.Unit.CONVERSATIONS else "documents"
        with (root / "lineage.jsonl").open("wb") as handle:
            for key, _stratum, sha in lineage:
                handle.write(
                    orjson.dumps({"id": key, "sha256": sha, "split": assignment[key]}) + b"\n"
                )
        lineage_sha = _sha256_file(root / "lineage.jsonl")
        split_parameters = {k: params[k] for k in ("splits", "seed", "stratify_by")} | {
            "field_mapping": params["field_mapping"]
        }
        fingerprint = hashlib.sha256(
            orjson.dumps(
                {
                    "unit": export.unit,
                    "features": features,
                    "parameters": split_parameters,
                    "lineage": lineage_sha,
                },
                option=orjson.OPT_SORT_KEYS,
            )
        ).hexdigest()
        previous = (
            Export.objects.series(
                corpus_id=export.corpus_id,
                training_file_id=export.training_file_id,
                unit=export.unit,
            )
            .succeeded()
            .exclude(pk=export.pk)
            .order_by("-finished_at")
            .first()
        )
        version, changelog = _next_version(
            previous=previous,
            lineage=lineage,
            features=features,
            split_parameters=split_parameters,
            fingerprint=fingerprint,
            unit_label=unit_label,
            counts=split_units,
        )
        described = source.describe()
        if export.corpus_id:
            described["languages"] = sorted(
                {
                    lang
                    for lang in Document.objects.filter(corpus=export.corpus)
                    .exclude(language__in=("", "und"))
                    .values_list("language", flat=True)
                    .distinct()[:20]
                }
            )
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "dataset": {
                "name": params["name"],
                "version": version,
                "unit": export.unit,
                "rows": sum(row_counts.values()),
            },
            "source": described,
            "parameters": split_parameters | {"csv": params["csv"]},
            "features": features,
            "splits": {s: {"rows": row_counts[s], unit_label: split_units[s]} for s in SPLITS},
            "lineage": {
                "source": described,
                unit_label: {"count": len(lineage), "file": "lineage.jsonl", "sha256": lineage_sha},
                "parameters": split_parameters,
                # The version this one follows (a re-export of unchanged content follows
                # the same one, so its manifest is byte-identical).
                "previous_version": changelog[1]["version"] if len(changelog) > 1 else None,
                "generator": "crucible corpora.exports",
            },
            "changelog": changelog,
            "files": [],
            "content_fingerprint": fingerprint,
        }
        if "hf" in export.formats:
            card = dataset_card(manifest=manifest, files=files, features=features)
            (root / "hf" / "README.md").write_text(card, encoding="utf-8")
            check_card(root, files, row_counts)
            readme = WrittenFile(path="hf/README.md", format="hf", split=None)
            readme.bytes = (root / readme.path).stat().st_size
            readme.sha256 = _sha256_file(root / readme.path)
            files.append(readme)
        files.sort(key=lambda f: f.path)
        manifest["files"] = [f.__dict__ for f in files] + [
            {
                "path": "lineage.jsonl",
                "format": "lineage",
                "split": None,
                "rows": len(lineage),
                "bytes": (root / "lineage.jsonl").stat().st_size,
                "sha256": lineage_sha,
            }
        ]
        (root / "CHANGELOG.md").write_text(
            f"# Changelog: {params['name']}\n\n"
            + "\n".join(
                f"## {entry['version']} ({entry['date']})\n\n"
                + "\n".join(f"- {c}" for c in entry["changes"])
                + "\n"
                for entry in changelog
            ),
            encoding="utf-8",
        )
        (root / "manifest.json").write_bytes(
            orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        )

        progress.step("Storing the files", 0.92)
        prefix = f"exports/{export.pk}"
        offered = []
        written = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        for relative in written:
            local = root / relative
            with local.open("rb") as handle:
                storage_save(f"{prefix}/{relative}", handle)
            size = storage_size(f"{prefix}/{relative}")
            _expect_stored(relative, size, local.stat().st_size)
            offered.append(
                {
                    "path": relative,
                    "bytes": size,
                    "sha256": _sha256_file(local),
                }
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    Export.objects.filter(pk=export.pk).update(
        status=Export.Status.SUCCEEDED,
        progress=1.0,
        progress_message="Ready",
        version=version,
        changelog=changelog,
        manifest=manifest,
        files=offered,
        content_fingerprint=fingerprint,
        row_count=sum(row_counts.values()),
        storage_prefix=prefix,
        finished_at=timezone.now(),
    )
    export.refresh_from_db()


def _expect_stored(relative: str, stored: int, local: int) -> None:
    if stored != local:
        raise ExportCheckFailed(f"{relative}: stored {stored} bytes of {local}")


def zip_stream(export: Export, chunk_size: int = 1 << 16) -> Iterator[bytes]:
    """The whole export as a ZIP, produced piece by piece (no temporary file)."""
    import zipfile

    class Sink(io.RawIOBase):
        def __init__(self):
            self.parts: list[bytes] = []
            self.offset = 0

        def writable(self):
            return True

        def write(self, data):
            self.parts.append(bytes(data))
            self.offset += len(data)
            return len(data)

        def tell(self):
            return self.offset

        def take(self) -> bytes:
            data, self.parts = b"".join(self.parts), []
            return data

    sink = Sink()
    top = f"{export.manifest.get('dataset', {}).get('name', 'export')}-{export.version}"
    top = re.sub(r"[^A-Za-z0-9._-]+", "-", top).strip("-") or "export"
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for entry in export.files:
            info = zipfile.ZipInfo(f"{top}/{entry['path']}", date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with (
                storage_open(f"{export.storage_prefix}/{entry['path']}") as source,
                archive.open(info, "w", force_zip64=True) as target,
            ):
                for block in iter(lambda: source.read(chunk_size), b""):
                    target.write(block)
                    yield sink.take()
            yield sink.take()
    yield sink.take()
