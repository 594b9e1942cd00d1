"""Turning source texts into corpus records (``manage.py build_corpus``).

Each source file becomes one document in the current corpus schema: its bytes decoded
(UTF-8, else the encoding charset-normalizer finds), its text normalised (Unicode form,
line ends, control characters, white space), chunked by tokens with an overlap, and
described (counts, hashes, language where a cheap guess is confident).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from corpora.schemas import CURRENT_CORPUS_VERSION
from corpora.tokens import Span, span_function

TEXT_SUFFIXES = (".txt", ".md", ".text")
SIDECAR_SUFFIX = ".meta.json"
SIDECAR_FIELDS = (
    "title",
    "document_type",
    "author",
    "date",
    "language",
    "source",
    "metadata",
    "extensions",
)

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\u200e\u200f\u2028\u2029]")
_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")

# The most frequent short words of a few languages: a cheap, offline language guess.
STOPWORDS = {
    "en": "the of and to in is that it for was on are with as be this by not but have we",
    "fr": "le la les de des et est un une que qui dans pour pas sur au du ce il nous",
    "de": "der die und das ist nicht ein eine zu den mit sich des auf für im dem wir",
    "es": "el la los las de que y en un una es por con para no se del al lo como",
    "it": "il la che di e un una per non sono con del della le gli si è come anche",
    "pt": "o a os as de que e em um uma para com não por se do da no na mais",
    "nl": "de het een en van in is dat op te zijn met voor niet aan er om ook als",
}
STOPWORD_SETS = {lang: set(words.split()) for lang, words in STOPWORDS.items()}


class SourceError(Exception):
    """A source file that cannot become a document (undecodable, empty, bad sidecar)."""


def decode(data: bytes) -> tuple[str, str]:
    """(text, encoding) of a source file's bytes."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="strict"), "utf-8-sig"
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None:
        raise SourceError("not text in any encoding charset-normalizer knows")
    return str(best), best.encoding


def normalize(text: str, form: str = "NFC") -> str:
    """Unicode form, \\n line ends, no control characters, single spaces, <= 1 blank line."""
    text = unicodedata.normalize(form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def guess_language(text: str, *, sample_words: int = 2000) -> str:
    """A language code when the stop words of one language clearly dominate, else und."""
    words = re.findall(r"[^\W\d_]+", text[: sample_words * 8].lower())[:sample_words]
    if len(words) < 5:
        return "und"
    scores = {
        lang: sum(1 for w in words if w in stopwords) for lang, stopwords in STOPWORD_SETS.items()
    }
    ranked = sorted(scores.items(), key=lambda item: -item[1])
    (best, top), (_, second) = ranked[0], ranked[1]
    if top / len(words) >= 0.08 and top >= 1.5 * second:
        return best
    return "und"


@dataclass(frozen=True)
class ChunkPlan:
    chunk_tokens: int = 256
    overlap: int = 32
    tokenizer: str = "approx"

    def __post_init__(self):
        if self.chunk_tokens < 8:
            raise ValueError("chunk size must be at least 8 tokens")
        if not 0 <= self.overlap < self.chunk_tokens:
            raise ValueError("the overlap must be at least 0 and below the chunk size")


def chunk(text: str, spans: list[Span], plan: ChunkPlan) -> list[dict]:
    """Chunks of at most ``plan.chunk_tokens`` tokens, each starting ``plan.overlap``
    tokens before the previous one ended; cut between spans, so never mid-word."""
    chunks = []
    start = 0
    while start < len(spans):
        end, tokens = start, 0
        while end < len(spans) and (tokens + spans[end][2] <= plan.chunk_tokens or end == start):
            tokens += spans[end][2]
            end += 1
        first, last = spans[start][0], spans[end - 1][1]
        chunks.append(
            {
                "position": len(chunks),
                "text": text[first:last],
                "token_count": tokens,
                "start_char": first,
                "end_char": last,
            }
        )
        if end >= len(spans):
            break
        back, kept = end, 0
        while back > start + 1 and kept + spans[back - 1][2] <= plan.overlap:
            kept += spans[back - 1][2]
            back -= 1
        start = back
    return chunks


def _title(text: str, path: Path) -> str:
    first = text.split("\n", 1)[0].lstrip("# ").strip()
    if 0 < len(first) <= 120:
        return first
    return path.stem.replace("-", " ").replace("_", " ").strip().capitalize()


def _sidecar(path: Path) -> dict:
    sidecar = path.with_name(path.stem + SIDECAR_SUFFIX)
    if not sidecar.exists():
        return {}
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceError(f"{sidecar.name} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SourceError(f"{sidecar.name} must hold a JSON object")
    unknown = sorted(set(data) - set(SIDECAR_FIELDS))
    if unknown:
        raise SourceError(
            f"{sidecar.name}: unknown field(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(SIDECAR_FIELDS)}"
        )
    return data


def source_files(folder: Path) -> list[Path]:
    """The text files under ``folder``, in a stable order."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not p.name.startswith(".")
    )


def build_record(
    path: Path,
    *,
    root: Path,
    plan: ChunkPlan,
    form: str = "NFC",
    document_type: str | None = None,
    spans: Callable[[str], list[Span]] | None = None,
) -> dict:
    """One corpus record (current schema) for the text file at ``path``."""
    raw = path.read_bytes()
    text, encoding = decode(raw)
    text = normalize(text, form)
    if not text:
        raise SourceError("empty after normalisation")
    sidecar = _sidecar(path)
    spans = (spans or span_function(plan.tokenizer))(text)
    relative = path.relative_to(root).with_suffix("").as_posix()
    record = {
        "schema_version": CURRENT_CORPUS_VERSION,
        "id": relative,
        "title": _title(text, path),
        "text": text,
        "language": guess_language(text),
        "source": {
            "path": path.relative_to(root).as_posix(),
            "sha256": hashlib.sha256(raw).hexdigest(),
        },
    }
    if document_type:
        record["document_type"] = document_type
    metadata = {
        "char_count": len(text),
        "word_count": len(text.split()),
        "token_count": sum(s[2] for s in spans),
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "source_encoding": encoding,
        "normalization": form,
        "tokenizer": plan.tokenizer,
        "chunking": {"chunk_tokens": plan.chunk_tokens, "overlap": plan.overlap},
    }
    for key in SIDECAR_FIELDS:
        if key in sidecar and key not in ("metadata", "source"):
            record[key] = sidecar[key]
    record["source"] |= sidecar.get("source", {})
    record["metadata"] = metadata | sidecar.get("metadata", {})
    record["chunks"] = chunk(text, spans, plan)
    return record
