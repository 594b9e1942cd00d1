"""Knowledge-base and RAG workflows.

- ``knowledge_base_create`` records a knowledge base and enqueues its build (``long`` queue);
  ``knowledge_base_request_update`` enqueues an update; ``knowledge_base_refresh`` is the
  build/update itself (the task calls it): it embeds only chunks that are new or whose
  content hash changed, in batches through the model gateway's ``embed`` (feature "rag"),
  writes them as one new segment, tombstones removed/changed rows, compacts when tombstones
  pile up, builds the approximate index above the size threshold, and publishes the result
  by switching ``manifest`` + ``version`` in one UPDATE.
- ``knowledge_base_add_texts`` adds ad-hoc texts (``POST /v1/embeddings`` with ``store``).
- ``rag_retrieve`` / ``rag_answer`` / ``rag_query``: retrieval first (no LLM call when no
  chunk passes the threshold), then an answer through the gateway's ``chat`` with numbered
  sources, its citations checked and graded (corpora/rag/grounding.py).

The gateway lives in jobs, above corpora: these calls go through the LLM port (config/llm.py)
that jobs fills in from its AppConfig.ready().
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from django.contrib.auth.models import AbstractUser
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from config import llm
from config.errors import Conflict, InvalidInput, NotFound
from config.longtasks import Heartbeat, Stopped, worker_claim
from corpora.models import Chunk, Corpus, Document, KnowledgeBase, KnowledgeBaseEntry
from corpora.rag import grounding
from corpora.rag import index as vindex

logger = logging.getLogger("crucible.rag")

DEFAULT_EMBEDDING_MODEL = "offline/all-minilm-l6-v2"
DEFAULT_CHAT_MODEL = "offline/smollm2-135m-instruct"
EMBED_BATCH = 64
# Cosine similarity a chunk needs to count as context (MiniLM: on-topic questions score
# 0.4-0.8 against their chunk, unrelated ones under 0.2 on the sample corpus).
DEFAULT_THRESHOLD = 0.3
DEFAULT_K = 5
MAX_K = 50
# Compact (rewrite visible vectors into one segment) when tombstones pass this share.
COMPACT_TOMBSTONE_SHARE = 0.3
NO_CONTEXT = "No relevant context found"

SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources given. Cite the source of every "
    "claim with its number in square brackets, like [1]. If the sources do not contain the "
    "answer, say that you do not know."
)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _caller(user, kb: KnowledgeBase | None) -> Any:
    return llm.caller(user=user if getattr(user, "pk", None) else None, feature="rag", subject=kb)


# --- Knowledge bases ----------------------------------------------------------------------------


def _check_embedding_model(key: str) -> str:
    key = (key or DEFAULT_EMBEDDING_MODEL).strip()
    if key not in llm.model_keys(capability="embeddings"):
        raise InvalidInput(
            f"'{key}' is not an enabled embedding model of the gateway registry.",
            details={"fields": [{"field": "embedding_model", "message": "unknown"}]},
        )
    return key


def _check_filter(chunk_filter: Any) -> dict:
    if chunk_filter in (None, ""):
        return {}
    if not isinstance(chunk_filter, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str | int | float | bool)
        for k, v in chunk_filter.items()
    ):
        raise InvalidInput(
            "The metadata filter must be an object of key: scalar value pairs.",
            details={"fields": [{"field": "filter", "message": "object of scalars"}]},
        )
    return dict(chunk_filter)


def knowledge_base_create(
    *,
    name: str,
    corpus_ids: list,
    user: AbstractUser | None,
    embedding_model: str = DEFAULT_EMBEDDING_MODEL,
    chunk_filter: dict | None = None,
    description: str = "",
) -> KnowledgeBase:
    """Record a knowledge base over ``corpus_ids`` and enqueue its build; returns at once."""
    name = (name or "").strip()
    if not name:
        raise InvalidInput(
            "The knowledge base needs a name.",
            details={"fields": [{"field": "name", "message": "required"}]},
        )
    ids = [str(c) for c in corpus_ids or []]
    if not ids:
        raise InvalidInput(
            "Choose at least one corpus.",
            details={"fields": [{"field": "corpora", "message": "required"}]},
        )
    try:
        corpora = list(Corpus.objects.filter(pk__in=ids))
    except Exception as exc:  # a malformed UUID
        raise InvalidInput(f"Not a corpus id: {exc}") from None
    missing = sorted(set(ids) - {str(c.pk) for c in corpora})
    if missing:
        raise InvalidInput(
            f"No corpus with id {', '.join(missing)}.",
            details={"fields": [{"field": "corpora", "message": "unknown id"}]},
        )
    model = _check_embedding_model(embedding_model)
    chunk_filter = _check_filter(chunk_filter)
    with transaction.atomic():
        kb = KnowledgeBase.objects.create(
            name=name[:200],
            description=description,
            embedding_model=model,
            chunk_filter=chunk_filter,
            created_by=user if getattr(user, "pk", None) else None,
            progress_message="Queued",
        )
        kb.corpora.set(corpora)
        _enqueue(kb.pk)
    return kb


def _enqueue(kb_id) -> None:
    from corpora.tasks import knowledge_base_build_task

    transaction.on_commit(lambda: knowledge_base_build_task.delay(str(kb_id)))


def knowledge_base_request_update(*, knowledge_base: KnowledgeBase) -> KnowledgeBase:
    """Mark the knowledge base for an update and enqueue it (a running build picks the
    request up when it finishes: it runs again)."""
    if knowledge_base.status == KnowledgeBase.Status.BUILDING and knowledge_base.claimed_by:
        raise Conflict(
            f"'{knowledge_base.name}' is still being built; update it once it is ready.",
            details={"id": str(knowledge_base.pk)},
        )
    with transaction.atomic():
        KnowledgeBase.objects.filter(pk=knowledge_base.pk).update(
            update_requested=True, updated_at=timezone.now()
        )
        if not knowledge_base.claimed_by:
            status = (
                KnowledgeBase.Status.UPDATING
                if knowledge_base.version
                else KnowledgeBase.Status.BUILDING
            )
            KnowledgeBase.objects.filter(pk=knowledge_base.pk, claimed_by="").update(
                status=status, progress=0.0, progress_message="Queued", error=""
            )
        _enqueue(knowledge_base.pk)
    knowledge_base.refresh_from_db()
    return knowledge_base


def knowledge_base_delete(*, knowledge_base: KnowledgeBase) -> None:
    """Delete the row (queries stop at once), then its files."""
    paths = vindex.manifest_paths(knowledge_base.manifest or {})
    prefix = vindex.segment_prefix(knowledge_base.pk)
    knowledge_base.delete()
    vindex.cache.drop(knowledge_base.pk)

    def remove() -> None:
        vindex.delete_files(paths)
        try:
            from config.storage import storage_listdir

            _, files = storage_listdir(prefix)
            vindex.delete_files([f"{prefix}/{name}" for name in files])
        except (OSError, NotImplementedError):
            pass

    transaction.on_commit(remove)


def knowledge_base_chunks(kb: KnowledgeBase):
    """The chunks the knowledge base covers now (its corpora, filtered)."""
    qs = Chunk.objects.filter(corpus__in=kb.corpora.all())
    for key, value in (kb.chunk_filter or {}).items():
        qs = qs.filter(
            Q(**{f"metadata__{key}": value}) | Q(**{f"document__metadata__{key}": value})
        )
    return qs


@dataclass
class RefreshCounts:
    chunks: int = 0
    embedded: int = 0
    embed_calls: int = 0
    tombstoned: int = 0
    unchanged: int = 0
    compacted: bool = False
    seconds: float = 0.0
    chunks_per_s: float = 0.0


def _embed_batches(
    kb: KnowledgeBase,
    texts: list[str],
    *,
    user,
    beat: Heartbeat | None,
    counts: RefreshCounts,
    batch: int | None = None,
) -> np.ndarray:
    batch = batch or EMBED_BATCH  # read at call time (the bench compares batch sizes)
    out: list[list[float]] = []
    for start in range(0, len(texts), batch):
        result = llm.embed(
            model=kb.embedding_model,
            input=texts[start : start + batch],
            caller=_caller(user, kb),
            interactive=False,
        )
        out += result.embeddings
        counts.embed_calls += 1
        if beat is not None:
            done = start + len(texts[start : start + batch])
            beat.tick(
                progress=0.05 + 0.85 * done / len(texts),
                progress_message=f"Embedded {done:,} of {len(texts):,} chunks",
            )
    if not out:
        return np.zeros((0, kb.dimensions or 0), dtype=np.float32)
    return vindex.normalise(np.asarray(out, dtype=np.float32))


def knowledge_base_refresh(
    *, kb_id, claim: str | None = None, user=None, beat_interval: float | None = None
) -> KnowledgeBase | None:
    """Build or update the knowledge base (the task's body). Claims the row atomically (a
    second delivery finds it claimed and returns None); publishes a new version at the end."""
    claim = claim or worker_claim()
    now = timezone.now()
    claimed = KnowledgeBase.objects.filter(
        pk=kb_id,
        status__in=[KnowledgeBase.Status.BUILDING, KnowledgeBase.Status.UPDATING],
        claimed_by="",
    ).update(claimed_by=claim, heartbeat_at=now, started_at=now, update_requested=False)
    if claimed != 1:
        return None
    kb = KnowledgeBase.objects.get(pk=kb_id)
    KnowledgeBase.objects.filter(pk=kb_id).update(attempts=kb.attempts + 1)
    beat = Heartbeat(KnowledgeBase, kb.pk, claim=claim, running=kb.status, interval=beat_interval)
    try:
        _refresh(kb, beat=beat, claim=claim, user=user or kb.created_by)
    except Stopped:
        logger.info("knowledge base %s: no longer ours, stopping", kb_id)
        return None
    except Exception as exc:
        logger.exception("knowledge base %s failed", kb_id)
        message = str(getattr(exc, "message", "") or exc) or type(exc).__name__
        KnowledgeBase.objects.filter(pk=kb_id, claimed_by=claim).update(
            status=KnowledgeBase.Status.FAILED if not kb.version else KnowledgeBase.Status.READY,
            claimed_by="",
            error=f"{type(exc).__name__}: {message}"[:2000],
            progress_message="Failed" if not kb.version else "Update failed; previous version kept",
            updated_at=timezone.now(),
        )
        return KnowledgeBase.objects.get(pk=kb_id)
    kb.refresh_from_db()
    if kb.update_requested:  # asked again while this run worked
        knowledge_base_request_update(knowledge_base=kb)
    return kb


def _refresh(kb: KnowledgeBase, *, beat: Heartbeat, claim: str, user) -> None:
    started = time.perf_counter()
    counts = RefreshCounts()
    beat.write(progress=0.01, progress_message="Reading chunks")
    current = {
        cid: (doc_id, content_hash(text), text)
        for cid, doc_id, text in knowledge_base_chunks(kb)
        .values_list("id", "document_id", "text")
        .iterator(chunk_size=2000)
    }
    counts.chunks = len(current)
    alive = {
        e.chunk_id: e
        for e in KnowledgeBaseEntry.objects.filter(knowledge_base=kb, tombstoned=False).only(
            "id", "chunk_id", "content_hash", "segment", "row"
        )
    }
    to_embed = [
        cid
        for cid, (_, digest, _) in current.items()
        if cid not in alive or alive[cid].content_hash != digest
    ]
    gone = [
        e for cid, e in alive.items() if cid not in current or current[cid][1] != e.content_hash
    ]
    counts.tombstoned = len(gone)
    counts.unchanged = len(current) - len(to_embed)
    beat.write(
        progress=0.05,
        progress_message=f"{len(to_embed):,} chunk(s) to embed, {len(gone):,} to remove",
    )
    vectors = _embed_batches(
        kb, [current[c][2] for c in to_embed], user=user, beat=beat, counts=counts
    )
    counts.embedded = len(to_embed)

    manifest = dict(kb.manifest or {})
    segments = [
        dict(s, tombstones=list(s.get("tombstones") or [])) for s in manifest.get("segments") or []
    ]
    next_segment = int(manifest.get("next_segment") or 1)
    dims = int(vectors.shape[1]) if len(vectors) else int(manifest.get("dims") or kb.dimensions)
    new_entries: list[KnowledgeBaseEntry] = []
    if len(to_embed):
        segment = vindex.write_segment(kb.pk, next_segment, vectors, np.asarray(to_embed))
        segments.append(segment)
        new_entries = [
            KnowledgeBaseEntry(
                knowledge_base=kb,
                chunk_id=cid,
                document_id=current[cid][0],
                content_hash=current[cid][1],
                segment=next_segment,
                row=row,
            )
            for row, cid in enumerate(to_embed)
        ]
        next_segment += 1
    by_number = {s["number"]: s for s in segments}
    for entry in gone:
        by_number[entry.segment]["tombstones"].append(entry.row)
    for s in segments:
        s["tombstones"] = sorted(set(s["tombstones"]))

    total = sum(s["count"] for s in segments)
    dead = sum(len(s["tombstones"]) for s in segments)
    old_paths: list[str] = []
    moved: dict[int, tuple[int, int]] = {}  # chunk id -> (segment, row) after compaction
    if dead and (dead / max(total, 1) >= COMPACT_TOMBSTONE_SHARE or total - dead == 0):
        beat.write(progress=0.92, progress_message="Compacting")
        all_vectors, all_ids = vindex.visible_arrays({"segments": segments, "dims": dims})
        old_paths = [p for s in segments for p in (s["vectors"], s["ids"])]
        segments = []
        if len(all_ids):
            segments = [vindex.write_segment(kb.pk, next_segment, all_vectors, all_ids)]
            moved = {int(cid): (next_segment, row) for row, cid in enumerate(all_ids)}
            next_segment += 1
        counts.compacted = True

    visible = sum(s["count"] - len(s["tombstones"]) for s in segments)
    ann = None
    recall = None
    new_version = kb.version + 1
    if visible >= vindex.ANN_THRESHOLD:
        beat.write(progress=0.94, progress_message=f"Building the approximate index ({visible:,})")
        all_vectors, _ = vindex.visible_arrays({"segments": segments, "dims": dims})
        with beat.keepalive():
            ann_index = vindex.build_ann(all_vectors)
            recall = vindex.measure_recall(ann_index, all_vectors)
        ann = dict(vindex.save_ann(kb.pk, new_version, ann_index), recall_at_10=round(recall, 4))
    if manifest.get("ann"):
        old_paths.append(manifest["ann"]["path"])
    new_manifest = {"segments": segments, "next_segment": next_segment, "dims": dims, "ann": ann}

    counts.seconds = round(time.perf_counter() - started, 3)
    counts.chunks_per_s = round(counts.embedded / counts.seconds, 1) if counts.seconds else 0.0
    with transaction.atomic():
        if gone:
            gone_ids = [e.pk for e in gone]
            for start in range(0, len(gone_ids), 10_000):  # under bound-parameter limits
                KnowledgeBaseEntry.objects.filter(pk__in=gone_ids[start : start + 10_000]).update(
                    tombstoned=True
                )
        KnowledgeBaseEntry.objects.bulk_create(new_entries, batch_size=2000)
        if counts.compacted:
            KnowledgeBaseEntry.objects.filter(knowledge_base=kb, tombstoned=True).delete()
            updates = list(KnowledgeBaseEntry.objects.filter(knowledge_base=kb))
            for entry in updates:
                entry.segment, entry.row = moved[entry.chunk_id]
            KnowledgeBaseEntry.objects.bulk_update(updates, ["segment", "row"], batch_size=2000)
        live = KnowledgeBaseEntry.objects.filter(knowledge_base=kb, tombstoned=False)
        digest = hashlib.sha256()
        for cid, h in live.order_by("chunk_id").values_list("chunk_id", "content_hash"):
            digest.update(f"{cid}\t{h}\n".encode())
        now = timezone.now()
        published = KnowledgeBase.objects.filter(pk=kb.pk, claimed_by=claim).update(
            manifest=new_manifest,
            version=new_version,
            status=KnowledgeBase.Status.READY,
            claimed_by="",
            dimensions=dims,
            chunk_count=visible,
            document_count=live.values("document_id").distinct().count(),
            tombstone_count=sum(len(s["tombstones"]) for s in segments),
            size_bytes=sum(s["bytes"] for s in segments) + (ann["bytes"] if ann else 0),
            checksum=digest.hexdigest(),
            recall_at_10=recall,
            last_build=asdict(counts),
            progress=1.0,
            progress_message=(
                f"Embedded {counts.embedded:,} chunk(s), removed {counts.tombstoned:,}"
            ),
            error="",
            built_at=kb.built_at or now,
            refreshed_at=now,
            updated_at=now,
        )
        if published != 1:
            raise Stopped(f"knowledge base {kb.pk} is no longer claimed by {claim}")
    if old_paths:
        # Queries already holding the old version have it in memory; new ones read the new one.
        transaction.on_commit(lambda: vindex.delete_files(old_paths))
    logger.info("knowledge base %s v%s: %s", kb.pk, new_version, asdict(counts))


def knowledge_base_add_texts(
    *,
    knowledge_base: KnowledgeBase,
    texts: list,
    user: AbstractUser | None,
) -> dict:
    """Add ad-hoc texts (strings, or {"text", "title"?, "metadata"?}) to a knowledge base:
    each becomes a one-chunk document of the knowledge base's own "added texts" corpus, and
    an update embeds just them (synchronously) and publishes a new version.

    Returns {"knowledge_base", "version", "chunk_ids", "document_ids", "embedded"}."""
    items = []
    for i, item in enumerate(texts or []):
        if isinstance(item, str):
            item = {"text": item}
        text = (item or {}).get("text") if isinstance(item, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput(
                f"Text {i} is empty or not a string.",
                details={"fields": [{"field": f"input[{i}]", "message": "non-empty string"}]},
            )
        items.append(item)
    if not items:
        raise InvalidInput("Give at least one text to add.")
    kb = knowledge_base
    if kb.claimed_by:
        raise Conflict(
            f"'{kb.name}' is being built or updated; add texts once it is ready.",
            details={"id": str(kb.pk), "status": kb.status},
        )
    from corpora.tokens import count_tokens

    with transaction.atomic():
        corpus = _added_texts_corpus(kb, user)
        last = Document.objects.filter(corpus=corpus).order_by("-position").first()
        position = last.position + 1 if last else 0
        docs, chunks = [], []
        for offset, item in enumerate(items):
            text = item["text"]
            doc = Document.objects.create(
                corpus=corpus,
                external_id=f"added-{position + offset}-{content_hash(text)[:8]}",
                position=position + offset,
                line_number=0,
                title=str(item.get("title") or text[:80]),
                text=text,
                metadata=item.get("metadata") if isinstance(item.get("metadata"), dict) else {},
                char_count=len(text),
                word_count=len(text.split()),
                token_count=count_tokens(text),
                chunk_count=1,
                sha256=content_hash(text),
            )
            docs.append(doc)
            chunks.append(
                Chunk(
                    corpus=corpus,
                    document=doc,
                    position=0,
                    text=text,
                    token_count=doc.token_count,
                    char_count=len(text),
                    start_char=0,
                    end_char=len(text),
                )
            )
        chunks = Chunk.objects.bulk_create(chunks)
        Corpus.objects.filter(pk=corpus.pk).update(
            record_count=Document.objects.filter(corpus=corpus).count(),
            chunk_count=Chunk.objects.filter(corpus=corpus).count(),
        )
        status = KnowledgeBase.Status.UPDATING if kb.version else KnowledgeBase.Status.BUILDING
        if KnowledgeBase.objects.filter(pk=kb.pk, claimed_by="").update(status=status) != 1:
            raise Conflict(f"'{kb.name}' is being built or updated; add texts once it is ready.")
    refreshed = knowledge_base_refresh(kb_id=kb.pk, user=user)
    if refreshed is None:
        raise Conflict(f"'{kb.name}' was claimed by a build meanwhile; the texts are queued.")
    return {
        "knowledge_base": str(kb.pk),
        "version": refreshed.version,
        "chunk_ids": [c.pk for c in chunks],
        "document_ids": [d.pk for d in docs],
        "embedded": refreshed.last_build.get("embedded", 0),
    }


def _added_texts_corpus(kb: KnowledgeBase, user) -> Corpus:
    for corpus in kb.corpora.all():
        if (corpus.stats or {}).get("added_texts_for") == str(kb.pk):
            return corpus
    corpus = Corpus.objects.create(
        name=f"Texts added to {kb.name}"[:200],
        description="Ad-hoc texts added through POST /v1/embeddings (store: true).",
        schema_version="2",
        source_schema_version="2",
        stats={"added_texts_for": str(kb.pk)},
        uploaded_by=user if getattr(user, "pk", None) else None,
    )
    kb.corpora.add(corpus)
    return corpus


# --- Query ------------------------------------------------------------------------------------


@dataclass
class Context:
    rank: int
    score: float
    chunk_id: int
    document_id: int
    document_external_id: str
    document_title: str
    corpus_id: str
    position: int
    start_char: int | None
    end_char: int | None
    text: str
    lexical_rank: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Retrieval:
    knowledge_base: KnowledgeBase
    question: str
    contexts: list[Context]  # top-k, best first (above and below the threshold)
    threshold: float
    best_score: float | None
    mode: str  # "exact" | "approximate" | "hybrid"
    version: int
    retrieval_ms: float

    @property
    def relevant(self) -> list[Context]:
        return [c for c in self.contexts if c.score >= self.threshold]


def _check_query(question: str, k: int, threshold: float) -> str:
    question = (question or "").strip()
    if not question:
        raise InvalidInput(
            "Ask a question.", details={"fields": [{"field": "question", "message": "required"}]}
        )
    if len(question) > 4000:
        raise InvalidInput("The question is longer than 4,000 characters.")
    if not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InvalidInput(
            f"k must be between 1 and {MAX_K}.",
            details={"fields": [{"field": "k", "message": f"1..{MAX_K}"}]},
        )
    if not -1.0 <= float(threshold) <= 1.0:
        raise InvalidInput(
            "The score threshold is a cosine similarity, between -1 and 1.",
            details={"fields": [{"field": "threshold", "message": "-1..1"}]},
        )
    return question


def _texts_of(chunk_ids: list[int]) -> dict[int, str]:
    out = {}
    for start in range(0, len(chunk_ids), 5000):
        out.update(
            Chunk.objects.filter(pk__in=chunk_ids[start : start + 5000]).values_list("id", "text")
        )
    return out


def rag_retrieve(
    *,
    knowledge_base: KnowledgeBase,
    question: str,
    k: int = DEFAULT_K,
    threshold: float = DEFAULT_THRESHOLD,
    filters: dict | None = None,
    hybrid: bool = False,
    user: AbstractUser | None = None,
) -> Retrieval:
    """The top-k chunks for ``question`` (embedded through the gateway)."""
    question = _check_query(question, k, threshold)
    filters = _check_filter(filters)
    started = time.perf_counter()
    kb = KnowledgeBase.objects.filter(pk=knowledge_base.pk).first()
    if kb is None:
        raise NotFound("No such knowledge base (it was deleted).")
    if not kb.is_queryable:
        raise Conflict(
            f"'{kb.name}' has no index yet ({kb.get_status_display().lower()}"
            f"{': ' + kb.error if kb.error else ''}).",
            details={"id": str(kb.pk), "status": kb.status},
        )
    query = llm.embed(model=kb.embedding_model, input=[question], caller=_caller(user, kb))
    qvec = vindex.normalise(np.asarray(query.embeddings, dtype=np.float32))[0]
    loaded = vindex.cache.get(kb.pk, kb.version, kb.manifest)
    mask = None
    if filters:
        allowed = knowledge_base_chunks(kb)
        for key, value in filters.items():
            allowed = allowed.filter(
                Q(**{f"metadata__{key}": value}) | Q(**{f"document__metadata__{key}": value})
            )
        mask = np.zeros(len(loaded), dtype=bool)
        mask[loaded.positions_of(allowed.values_list("id", flat=True))] = True
    # Removed chunks vanish at once: fetch a few extra and drop those no longer in the DB.
    want = k + 10
    dense = loaded.dense(qvec, want, mask)
    mode = "approximate" if loaded.ann is not None and mask is None else "exact"
    lexical_rank: dict[int, int] = {}
    if hybrid:
        lexical = loaded.lexical(question, want, _texts_of, mask)
        lexical_rank = {p: r for r, (p, _) in enumerate(lexical, start=1)}
        order = [p for p, _ in vindex.rrf([[p for p, _ in dense], [p for p, _ in lexical]])]
        mode = "hybrid"
    else:
        order = [p for p, _ in dense]
    cosine = {p: s for p, s in dense}
    for p in order:
        if p not in cosine:
            cosine[p] = float(loaded.vectors[p] @ qvec)
    ids = [int(loaded.chunk_ids[p]) for p in order]
    rows = {
        c.pk: c
        for c in Chunk.objects.filter(pk__in=ids)
        .select_related("document")
        .only(
            "id",
            "corpus_id",
            "position",
            "text",
            "start_char",
            "end_char",
            "document__id",
            "document__title",
            "document__external_id",
        )
    }
    contexts: list[Context] = []
    for p, cid in zip(order, ids, strict=True):
        chunk = rows.get(cid)
        if chunk is None:
            continue
        contexts.append(
            Context(
                rank=len(contexts) + 1,
                score=round(cosine[p], 4),
                chunk_id=cid,
                document_id=chunk.document.pk,
                document_external_id=chunk.document.external_id,
                document_title=chunk.document.title or chunk.document.external_id,
                corpus_id=str(chunk.corpus_id),
                position=chunk.position,
                start_char=chunk.start_char,
                end_char=chunk.end_char,
                text=chunk.text,
                lexical_rank=lexical_rank.get(p),
            )
        )
        if len(contexts) == k:
            break
    best = max((c.score for c in contexts), default=None)
    return Retrieval(
        knowledge_base=kb,
        question=question,
        contexts=contexts,
        threshold=float(threshold),
        best_score=best,
        mode=mode,
        version=kb.version,
        retrieval_ms=round((time.perf_counter() - started) * 1000, 2),
    )


def _profile_settings(profile: str | None) -> tuple[dict, str, str]:
    """Decoding settings, extra system text and label of a response profile ("name" or
    "name@vN"; issue 15's jobs.ResponseProfile), or defaults."""
    request = {"temperature": 0, "max_tokens": 256}
    if not profile:
        return request, "", ""
    from django.apps import apps

    try:
        model = apps.get_model("jobs", "ResponseProfile")
    except LookupError:
        raise InvalidInput("Response profiles are not available on this server.") from None
    name, _, version = profile.partition("@v")
    qs = model.objects.filter(name=name)
    if version.isdigit():
        qs = qs.filter(version=int(version))
    found = qs.order_by("-version").first()
    if found is None:
        raise InvalidInput(
            f"No response profile '{profile}'.",
            details={"fields": [{"field": "profile", "message": "unknown"}]},
        )
    request.update(temperature=found.temperature, top_p=found.top_p, max_tokens=found.max_tokens)
    return request, found.persona or "", found.label


def rag_prompt(question: str, contexts: list[Context]) -> list[dict]:
    sources = "\n\n".join(
        f"[{i}] {c.document_title}\n{c.text}" for i, c in enumerate(contexts, start=1)
    )
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Sources:\n\n{sources}\n\nQuestion: {question}"},
    ]


def rag_answer(
    *,
    retrieval: Retrieval,
    model: str = DEFAULT_CHAT_MODEL,
    profile: str | None = None,
    user: AbstractUser | None = None,
) -> dict:
    """The full response for a retrieval: the no-context answer (no LLM call) when no chunk
    passes the threshold, else an answer through the gateway with its citations checked."""
    kb = retrieval.knowledge_base
    base = {
        "knowledge_base": str(kb.pk),
        "index_version": retrieval.version,
        "question": retrieval.question,
        "threshold": retrieval.threshold,
        "best_score": retrieval.best_score,
        "retrieval_mode": retrieval.mode,
        "timings": {"retrieval_ms": retrieval.retrieval_ms, "generation_ms": 0.0},
    }
    relevant = retrieval.relevant
    if not relevant:
        best = "none" if retrieval.best_score is None else f"{retrieval.best_score:.3f}"
        return base | {
            "no_context": True,
            "answer": NO_CONTEXT,
            "message": f"{NO_CONTEXT}: the best chunk scored {best}, under the threshold "
            f"{retrieval.threshold:.2f}; no model was called.",
            "contexts": [c.as_dict() for c in retrieval.contexts],
            "citations": [],
            "invalid_citations": [],
            "sentences": [],
            "grounded": False,
            "faithfulness": 0.0,
            "flags": ["no_context"],
            "model": None,
            "profile": None,
            "usage": None,
        }
    request, persona, profile_label = _profile_settings(profile)
    messages = rag_prompt(retrieval.question, relevant)
    if persona:
        messages[0]["content"] = persona.strip() + "\n\n" + messages[0]["content"]
    started = time.perf_counter()
    result = llm.chat(
        model=model or DEFAULT_CHAT_MODEL,
        request={"messages": messages, **request},
        caller=_caller(user, kb),
    )
    generation_ms = round((time.perf_counter() - started) * 1000, 2)
    sources = {i: c.text for i, c in enumerate(relevant, start=1)}
    graded = grounding.check_answer(result.text, sources)
    contexts = []
    for i, c in enumerate(relevant, start=1):
        contexts.append(c.as_dict() | {"source": i, "cited": i in graded.citations})
    return base | {
        "no_context": False,
        "answer": graded.answer,
        "raw_answer": result.text,
        "message": "",
        "contexts": contexts,
        "citations": [
            {
                "source": n,
                "chunk_id": relevant[n - 1].chunk_id,
                "document_id": relevant[n - 1].document_id,
            }
            for n in graded.citations
        ],
        "invalid_citations": graded.invalid_citations,
        "sentences": [s.as_dict() for s in graded.sentences],
        "grounded": graded.grounded,
        "faithfulness": round(graded.faithfulness, 3),
        "flags": graded.flags,
        "model": result.meta.model,
        "profile": profile_label or None,
        "usage": {
            "prompt_tokens": result.meta.prompt_tokens,
            "completion_tokens": result.meta.completion_tokens,
            "cost": str(result.meta.cost),
            "cached": result.meta.cached,
            "ledger_id": result.meta.ledger_id,
        },
        "timings": {"retrieval_ms": retrieval.retrieval_ms, "generation_ms": generation_ms},
    }


def rag_query(
    *,
    knowledge_base: KnowledgeBase,
    question: str,
    k: int = DEFAULT_K,
    threshold: float = DEFAULT_THRESHOLD,
    model: str = DEFAULT_CHAT_MODEL,
    profile: str | None = None,
    filters: dict | None = None,
    hybrid: bool = False,
    user: AbstractUser | None = None,
) -> dict:
    """Retrieve, then answer (see ``rag_answer``)."""
    retrieval = rag_retrieve(
        knowledge_base=knowledge_base,
        question=question,
        k=k,
        threshold=threshold,
        filters=filters,
        hybrid=hybrid,
        user=user,
    )
    return rag_answer(retrieval=retrieval, model=model, profile=profile, user=user)


def retrieval_from_chunks(
    *,
    knowledge_base: KnowledgeBase,
    question: str,
    chunk_scores: list[tuple[int, float]],
    threshold: float,
    mode: str,
    retrieval_ms: float,
) -> Retrieval:
    """Rebuild a retrieval from chunk ids and scores (the explorer page's second request),
    reading the chunks again: removed ones are dropped."""
    ids = [cid for cid, _ in chunk_scores]
    rows = {c.pk: c for c in Chunk.objects.filter(pk__in=ids).select_related("document")}
    contexts = []
    for cid, score in chunk_scores:
        chunk = rows.get(cid)
        if chunk is None:
            continue
        contexts.append(
            Context(
                rank=len(contexts) + 1,
                score=float(score),
                chunk_id=cid,
                document_id=chunk.document.pk,
                document_external_id=chunk.document.external_id,
                document_title=chunk.document.title or chunk.document.external_id,
                corpus_id=str(chunk.corpus_id),
                position=chunk.position,
                start_char=chunk.start_char,
                end_char=chunk.end_char,
                text=chunk.text,
            )
        )
    return Retrieval(
        knowledge_base=knowledge_base,
        question=_check_query(question, 1, threshold),
        contexts=contexts,
        threshold=threshold,
        best_score=max((c.score for c in contexts), default=None),
        mode=mode,
        version=knowledge_base.version,
        retrieval_ms=retrieval_ms,
    )
