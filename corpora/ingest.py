"""The write side of corpus ingestion: batched inserts and the statistics after them.

``DocumentWriter`` receives valid records one at a time (from
``corpora.validation.iter_corpus_records``) and writes documents and chunks in batches,
so memory stays bounded whatever the size of the file. Duplicate ids are found by the
database's unique (corpus, id) index, which holds every earlier batch and, when
appending, the corpus so far: no set of every id is kept in memory.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import Counter

import orjson
from django.db import connection
from django.db.models import Avg, Count, FloatField, Max, Min, Q, Sum
from django.db.models.fields.json import KeyTextTransform, KeyTransform
from django.db.models.functions import Cast

from corpora.models import Chunk, Corpus, CorpusIngestion, Document
from corpora.validation import MAX_REPORTED_PROBLEMS, CorpusRecord, JsonlReport

BATCH_SIZE = 1000
TOKEN_BUCKETS = (0, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
TOP_VALUES = 20


class DocumentWriter:
    """Batched, duplicate-checked inserts of documents and their chunks.

    Call ``close()`` at the end to write the last batch. (Writing on a second thread,
    to overlap parsing with the inserts, was measured slower: the GIL serialises most
    of both.)
    """

    def __init__(
        self,
        *,
        corpus: Corpus,
        ingestion: CorpusIngestion,
        report: JsonlReport,
        start_position: int = 0,
        batch_size: int | None = None,
    ) -> None:
        self.corpus = corpus
        self.ingestion = ingestion
        self.report = report
        self.position = start_position
        self.batch_size = batch_size or BATCH_SIZE
        self.batch: list[CorpusRecord] = []
        self.records = 0
        self.chunks = 0
        self.problems: list[dict] = []
        self.problem_total = 0
        self.db = connection
        # Statistics and checksum of what this writer stored, as it goes (in corpus
        # order), so a new corpus needs no second pass over its documents.
        self.summary = StreamSummary()
        self.corpus_db = Document._meta.get_field("corpus").get_db_prep_save(corpus.pk, self.db)
        self.adapt = _json_adapter(self.db)
        quote = self.db.ops.quote_name
        self.table = quote(Document._meta.db_table)
        self.insert_documents = _insert_sql(self.db, Document, DOCUMENT_COLUMNS, True)
        self.insert_chunks = _insert_sql(self.db, Chunk, CHUNK_COLUMNS, False)

    def add(self, item: CorpusRecord) -> None:
        self.batch.append(item)
        if len(self.batch) >= self.batch_size:
            self._submit()

    def _submit(self) -> None:
        batch, self.batch = self.batch, []
        if batch:
            first, self.position = self.position, self.position + len(batch)
            self._write(first, batch)

    def close(self) -> None:
        """Write what is left."""
        self._submit()

    def _report_duplicates(self, cursor, missing: list[CorpusRecord]) -> None:
        """Lines whose id was already taken (the insert skipped them): say where."""
        ids = [item.record["id"] for item in missing]
        cursor.execute(
            # Identifiers from the model's metadata; every value is a parameter.
            f"SELECT external_id, line_number, ingestion_id FROM {self.table} "  # noqa: S608
            f"WHERE corpus_id = %s AND external_id IN ({', '.join(['%s'] * len(ids))})",
            [self.corpus_db, *ids],
        )
        found = {doc_id: (line, ingestion) for doc_id, line, ingestion in cursor.fetchall()}
        for item in missing:
            line, ingestion_id = found.get(item.record["id"], (None, None))
            where = (
                f"first on line {line}"
                if ingestion_id == self.ingestion.pk
                else f"already in the corpus from an earlier upload, line {line}"
            )
            self.report.add_error(item.line, "/id", f"duplicate id '{item.record['id']}' ({where})")

    def _write(self, first: int, batch: list[CorpusRecord]) -> None:
        corpus_db, ingestion_id, adapt = self.corpus_db, self.ingestion.pk, self.adapt
        documents = []
        for position, item in enumerate(batch, start=first):
            record = item.record
            text = record["text"]
            documents.append(
                (
                    corpus_db,
                    ingestion_id,
                    record["id"],
                    position,
                    item.line,
                    record.get("title", ""),
                    text,
                    record.get("document_type", ""),
                    record.get("author", ""),
                    record.get("date", ""),
                    record.get("language", ""),
                    adapt(record.get("source")),
                    adapt(record.get("metadata")),
                    adapt(record.get("extensions")),
                    len(text),
                    item.word_count,
                    item.token_count,
                    len(item.chunk_tokens),
                    item.sha256,
                )
            )
        with self.db.cursor() as cursor:
            # A duplicate id (in this batch, an earlier one, or the corpus) is skipped by
            # the unique constraint: its position comes back missing below.
            cursor.executemany(self.insert_documents, documents)
            cursor.execute(
                f"SELECT position, id FROM {self.table} "  # noqa: S608
                "WHERE corpus_id = %s AND position >= %s AND position < %s",
                [corpus_db, first, first + len(batch)],
            )
            ids = dict(cursor.fetchall())
            chunks = []
            missing = []
            for position, item in enumerate(batch, start=first):
                document_id = ids.get(position)
                if document_id is None:
                    missing.append(item)
                    continue
                self.summary.add(item)
                if item.problem:
                    self.problem_total += 1
                    if len(self.problems) < MAX_REPORTED_PROBLEMS:
                        self.problems.append(
                            {
                                "line": item.line,
                                "document_id": item.record["id"],
                                "message": item.problem,
                            }
                        )
                for chunk, tokens in zip(
                    item.record.get("chunks", ()), item.chunk_tokens, strict=True
                ):
                    chunks.append(
                        (
                            corpus_db,
                            document_id,
                            chunk["position"],
                            chunk["text"],
                            tokens,
                            len(chunk["text"]),
                            chunk.get("start_char"),
                            chunk.get("end_char"),
                            adapt(chunk.get("metadata")),
                        )
                    )
            if missing:
                self._report_duplicates(cursor, missing)
            if chunks:
                cursor.executemany(self.insert_chunks, chunks)
        self.records += len(ids)
        self.chunks += len(chunks)


def _json_adapter(db):
    """Python value -> what the backend stores for a JSONField (empty object if None).

    SQLite keeps JSON as text: orjson writes it several times faster than the json
    module that ``adapt_json_value`` uses. Other backends get Django's own adapter.
    """
    if db.vendor == "sqlite":
        dumps = orjson.dumps

        def adapt(value):
            return dumps(value).decode() if value else "{}"

        return adapt
    adapt_json = db.ops.adapt_json_value
    return lambda value: adapt_json(value or {}, None)


DOCUMENT_COLUMNS = (
    "corpus",
    "ingestion",
    "external_id",
    "position",
    "line_number",
    "title",
    "text",
    "document_type",
    "author",
    "date",
    "language",
    "source",
    "metadata",
    "extensions",
    "char_count",
    "word_count",
    "token_count",
    "chunk_count",
    "sha256",
)
CHUNK_COLUMNS = (
    "corpus",
    "document",
    "position",
    "text",
    "token_count",
    "char_count",
    "start_char",
    "end_char",
    "metadata",
)


def _insert_sql(db, model, fields: tuple[str, ...], skip_conflicts: bool) -> str:
    """One INSERT statement for ``executemany``.

    Why not ``bulk_create``: building model instances and compiling the SQL costs about
    five times the insert itself (measured with bench/bench_ingestion.py). Values are
    adapted the way the fields would: JSON by ``_json_adapter``, the corpus UUID by
    its field.
    """
    quote = db.ops.quote_name
    columns = ", ".join(quote(model._meta.get_field(name).column) for name in fields)
    return (
        f"INSERT INTO {quote(model._meta.db_table)} ({columns}) "  # noqa: S608
        f"VALUES ({', '.join(['%s'] * len(fields))})"
        + (" ON CONFLICT DO NOTHING" if skip_conflicts else "")
    )


class StreamSummary:
    """``corpus_statistics`` and ``corpus_checksum`` computed from the stream.

    Exact for the documents this writer stored (they are the whole corpus for a new
    corpus or a replacement); ``corpus_statistics`` from the database stays the
    reference, and the tests check both agree. Too many distinct types or languages
    (over ``MAX_DISTINCT``) mark it ``complete = False``: the caller then asks the
    database.
    """

    MAX_DISTINCT = 10_000

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.documents = self.chunks = self.tokens = self.words = self.characters = 0
        self.min_tokens: int | None = None
        self.max_tokens = 0
        self.buckets = [0] * len(TOKEN_BUCKETS)
        self.types: Counter = Counter()
        self.languages: Counter = Counter()
        self.extensions: Counter = Counter()
        self.score_count = 0
        self.score_sum = 0.0
        self.score_min: float | None = None
        self.score_max: float | None = None
        self.complete = True

    def add(self, item: CorpusRecord) -> None:
        record = item.record
        self.digest.update(f"{record['id']}\t{item.sha256}\n".encode())
        tokens = item.token_count
        self.documents += 1
        self.chunks += len(item.chunk_tokens)
        self.tokens += tokens
        self.words += item.word_count
        self.characters += len(record["text"])
        self.min_tokens = tokens if self.min_tokens is None else min(self.min_tokens, tokens)
        self.max_tokens = max(self.max_tokens, tokens)
        self.buckets[bisect.bisect_right(TOKEN_BUCKETS, tokens) - 1] += 1
        for counter, value in (
            (self.types, record.get("document_type", "")),
            (self.languages, record.get("language", "")),
        ):
            if value in counter or len(counter) < self.MAX_DISTINCT:
                counter[value] += 1
            else:
                self.complete = False
        extensions = record.get("extensions")
        if extensions:
            for name in ("narrative", "quality"):
                if name in extensions:
                    self.extensions[name] += 1
            quality = extensions.get("quality")
            if quality is not None:
                score = float(quality["score"])
                self.score_count += 1
                self.score_sum += score
                self.score_min = score if self.score_min is None else min(self.score_min, score)
                self.score_max = score if self.score_max is None else max(self.score_max, score)

    def checksum(self) -> str:
        return self.digest.hexdigest()

    def statistics(self) -> dict:
        def top(counter: Counter) -> list[dict]:
            ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_VALUES]
            return _top(ranked)

        return {
            "documents": self.documents,
            "chunks": self.chunks,
            "tokens": self.tokens,
            "words": self.words,
            "characters": self.characters,
            "tokens_per_document": {
                "min": self.min_tokens or 0,
                "max": self.max_tokens,
                "mean": round(self.tokens / self.documents, 1) if self.documents else 0,
            },
            "length_histogram": [
                {"bucket": label, "count": count}
                for label, count in zip(_bucket_labels(), self.buckets, strict=True)
            ],
            "document_types": top(self.types),
            "languages": top(self.languages),
            "extensions": {k: v for k, v in sorted(self.extensions.items()) if v},
            "quality_score": {
                "count": self.score_count,
                "mean": round(self.score_sum / self.score_count, 3),
                "min": self.score_min,
                "max": self.score_max,
            }
            if self.score_count
            else None,
        }


def _bucket_labels() -> list[str]:
    return [
        f"{low}-{high - 1}" if high else f"{low}+"
        for low, high in zip(TOKEN_BUCKETS, (*TOKEN_BUCKETS[1:], None), strict=True)
    ]


def _top(counter_rows) -> list[dict]:
    return [{"value": value or "(none)", "count": count} for value, count in counter_rows]


def corpus_statistics(corpus: Corpus) -> dict:
    """Counts, length distribution, types, languages, extensions and quality, from the DB."""
    documents = Document.objects.filter(corpus=corpus)
    bucket_counts = {}
    for low, high in zip(TOKEN_BUCKETS, (*TOKEN_BUCKETS[1:], None), strict=True):
        condition = Q(token_count__gte=low) & (Q(token_count__lt=high) if high else Q())
        label = f"{low}-{high - 1}" if high else f"{low}+"
        bucket_counts[label] = Count("pk", filter=condition)
    totals = documents.aggregate(
        documents=Count("pk"),
        chunks=Sum("chunk_count"),
        tokens=Sum("token_count"),
        words=Sum("word_count"),
        characters=Sum("char_count"),
        min_tokens=Min("token_count"),
        max_tokens=Max("token_count"),
        mean_tokens=Avg("token_count"),
        **{f"bucket_{i}": agg for i, agg in enumerate(bucket_counts.values())},
    )
    score = Cast(KeyTextTransform("score", KeyTransform("quality", "extensions")), FloatField())
    quality = documents.filter(extensions__has_key="quality").aggregate(
        count=Count("pk"), mean=Avg(score), min=Min(score), max=Max(score)
    )
    types = (
        documents.values_list("document_type")
        .annotate(n=Count("pk"))
        .order_by("-n", "document_type")[:TOP_VALUES]
    )
    languages = (
        documents.values_list("language")
        .annotate(n=Count("pk"))
        .order_by("-n", "language")[:TOP_VALUES]
    )
    extensions = {
        name: documents.filter(extensions__has_key=name).count()
        for name in ("narrative", "quality")
    }
    return {
        "documents": totals["documents"],
        "chunks": totals["chunks"] or 0,
        "tokens": totals["tokens"] or 0,
        "words": totals["words"] or 0,
        "characters": totals["characters"] or 0,
        "tokens_per_document": {
            "min": totals["min_tokens"] or 0,
            "max": totals["max_tokens"] or 0,
            "mean": round(totals["mean_tokens"] or 0, 1),
        },
        "length_histogram": [
            {"bucket": label, "count": totals[f"bucket_{i}"]}
            for i, label in enumerate(bucket_counts)
        ],
        "document_types": _top(types),
        "languages": _top(languages),
        "extensions": {k: v for k, v in sorted(extensions.items()) if v},
        "quality_score": {
            "count": quality["count"],
            "mean": round(quality["mean"], 3),
            "min": quality["min"],
            "max": quality["max"],
        }
        if quality["count"]
        else None,
    }


def corpus_checksum(corpus: Corpus) -> str:
    """SHA-256 over ``id<TAB>content hash`` of every document, in corpus order."""
    digest = hashlib.sha256()
    rows = (
        Document.objects.filter(corpus=corpus)
        .order_by("position")
        .values_list("external_id", "sha256")
        .iterator(chunk_size=5000)
    )
    for external_id, sha in rows:
        digest.update(f"{external_id}\t{sha}\n".encode())
    return digest.hexdigest()
