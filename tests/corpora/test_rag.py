"""RAG acceptance: a knowledge base over the sample corpus (samples/corpus/speeches.jsonl),
embedded with the offline MiniLM through the gateway; answers from the loopback OpenAI
server scripted per test, so that citations and the ledger are real.

The fixtures here (``sample_corpus``, ``sample_kb``, ``answer_with``) are imported by the other
test_rag_*.py modules.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from billing.models import LlmCall
from config.errors import Conflict, InvalidInput
from config.storage import storage_exists
from corpora import services as corpus_services
from corpora.models import Chunk, Document, KnowledgeBase, KnowledgeBaseEntry
from corpora.rag import grounding
from corpora.rag import index as vindex
from corpora.rag import services as rag
from jobs import gateway
from tests.jobs.openai_server import OpenAIServer

pytest_plugins = ["tests.jobs.openai_server"]
pytestmark = pytest.mark.django_db

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples" / "corpus" / "speeches.jsonl"

FEAR = "What is the only thing we have to fear?"
FEAR_CHUNK = ("speeches/first-inaugural-1933", 1)


@pytest.fixture(autouse=True)
def _offline(settings):
    settings.TRAINING_MODEL_CACHE = os.environ.get(
        "CRUCIBLE_MODEL_CACHE", str(REPO / "var" / "models")
    )
    settings.GATEWAY_OFFLINE_DEVICE = "cpu"
    vindex.cache.clear()
    yield
    vindex.cache.clear()


@pytest.fixture
def sample_corpus(db):
    return corpus_services.corpus_create(
        name="Speeches", upload=io.BytesIO(SAMPLES.read_bytes()), user=None
    )


def build(kb: KnowledgeBase) -> KnowledgeBase:
    """Run the build the task would run (the tests call the service the task calls)."""
    done = rag.knowledge_base_refresh(kb_id=kb.pk)
    assert done is not None and done.status == KnowledgeBase.Status.READY, done and done.error
    return done


@pytest.fixture
def sample_kb(sample_corpus, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as queued:
        kb = rag.knowledge_base_create(name="Speeches KB", corpus_ids=[sample_corpus.pk], user=None)
    assert len(queued) == 1  # the build task, enqueued on commit
    return build(kb)


@pytest.fixture
def answer_with(openai_server: OpenAIServer, loopback_model, fast_gateway):
    """``answer_with("text [1]")``: the loopback chat model answers that; returns its key."""

    def script(text: str) -> str:
        def completion(body: dict) -> dict:
            out = OpenAIServer.completion(body)
            out["choices"][0]["message"]["content"] = text
            return out

        openai_server.completion = completion
        return loopback_model.key

    return script


def chunk_key(context) -> tuple[str, int]:
    get = context.get if isinstance(context, dict) else lambda k: getattr(context, k)
    return (get("document_external_id"), get("position"))


def chat_rows(model_key: str):
    return LlmCall.objects.filter(model=model_key, operation="chat")


# --- Building ---------------------------------------------------------------------------------


def test_knowledge_base_from_the_sample_corpus(sample_kb, sample_corpus):
    kb = sample_kb
    assert kb.version == 1 and kb.status == "ready" and kb.claimed_by == ""
    assert kb.chunk_count == sample_corpus.chunk_count == 15
    assert kb.document_count == 4 and kb.dimensions == 384
    assert kb.embedding_model == "offline/all-minilm-l6-v2"
    assert kb.built_at and kb.refreshed_at and len(kb.checksum) == 64
    assert kb.last_build["embedded"] == 15 and kb.last_build["embed_calls"] == 1
    # One segment in storage: normalised float32 vectors and their chunk ids.
    (segment,) = kb.manifest["segments"]
    assert storage_exists(segment["vectors"]) and storage_exists(segment["ids"])
    vectors, ids = vindex.read_segment(segment)
    assert vectors.dtype == np.float32 and vectors.shape == (15, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert sorted(ids.tolist()) == sorted(Chunk.objects.values_list("id", flat=True))
    assert kb.size_bytes == segment["bytes"] > 15 * 384 * 4
    assert kb.manifest["ann"] is None and kb.recall_at_10 is None  # small: exact search
    assert KnowledgeBaseEntry.objects.filter(knowledge_base=kb).count() == 15
    # Embeddings went through the gateway, attributed to the RAG feature and the KB.
    rows = LlmCall.objects.filter(operation="embeddings", feature="rag")
    assert rows.count() == 1 and rows.get().object_id == str(kb.pk)


def test_a_second_delivery_of_the_build_does_nothing(sample_kb):
    assert rag.knowledge_base_refresh(kb_id=sample_kb.pk) is None  # ready: nothing to claim
    assert KnowledgeBase.objects.get(pk=sample_kb.pk).version == 1


def test_bad_knowledge_base_input_writes_nothing(sample_corpus):
    bad = [
        {"name": "", "corpus_ids": [sample_corpus.pk]},
        {"name": "x", "corpus_ids": []},
        {"name": "x", "corpus_ids": ["5b0e7a52-0000-0000-0000-000000000000"]},
        {"name": "x", "corpus_ids": [sample_corpus.pk], "embedding_model": "offline/nope"},
        {"name": "x", "corpus_ids": [sample_corpus.pk], "chunk_filter": {"a": [1]}},
    ]
    for kwargs in bad:
        with pytest.raises(InvalidInput):
            rag.knowledge_base_create(user=None, **kwargs)
    assert not KnowledgeBase.objects.exists()


def test_metadata_filter_limits_the_chunks(sample_corpus, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        kb = rag.knowledge_base_create(
            name="Rights",
            corpus_ids=[sample_corpus.pk],
            user=None,
            chunk_filter={"topic": "rights"},
        )
    kb = build(kb)
    assert kb.chunk_count == 3 and kb.document_count == 1


# --- Query ------------------------------------------------------------------------------------


def test_question_retrieves_its_chunk_first_and_the_answer_cites_it(sample_kb, answer_with):
    model = answer_with("The only thing we have to fear is fear itself [1].")
    out = rag.rag_query(knowledge_base=sample_kb, question=FEAR, model=model, k=5)
    assert out["no_context"] is False
    top = out["contexts"][0]
    assert chunk_key(top) == FEAR_CHUNK and top["rank"] == 1 and top["source"] == 1
    assert top["cited"] is True and top["score"] >= out["threshold"]
    assert top["document_title"] == "First Inaugural Address (excerpt)"
    assert (top["start_char"], top["end_char"]) == (284, 479)
    assert "fear itself" in top["text"]
    assert out["citations"] == [
        {"source": 1, "chunk_id": top["chunk_id"], "document_id": top["document_id"]}
    ]
    assert out["invalid_citations"] == [] and out["grounded"] is True
    assert out["faithfulness"] == 1.0 and out["sentences"][0]["supported"] is True
    assert out["answer"] == "The only thing we have to fear is fear itself [1]."
    assert out["timings"]["retrieval_ms"] > 0 and out["timings"]["generation_ms"] > 0
    # One chat call in the ledger, for RAG, with the numbered source in the prompt.
    (row,) = chat_rows(model)
    assert row.feature == "rag" and row.object_id == str(sample_kb.pk)
    assert out["usage"]["ledger_id"] == row.pk


def test_prompt_numbers_the_sources(sample_kb, answer_with, openai_server):
    model = answer_with("Fear itself [1].")
    rag.rag_query(knowledge_base=sample_kb, question=FEAR, model=model, k=3)
    (call,) = openai_server.calls()
    prompt = call.body["messages"][-1]["content"]
    assert prompt.startswith("Sources:\n\n[1] First Inaugural Address (excerpt)\n")
    assert "Question: " + FEAR in prompt
    assert "[n]" not in prompt and "like [1]" in call.body["messages"][0]["content"]


def test_off_topic_question_gets_no_context_and_no_llm_call(sample_kb, answer_with, openai_server):
    model = answer_with("should never be asked [1]")
    out = rag.rag_query(
        knowledge_base=sample_kb, question="What is a good recipe for chocolate cake?", model=model
    )
    assert out["no_context"] is True and out["answer"] == "No relevant context found"
    assert out["best_score"] is not None and out["best_score"] < out["threshold"]
    assert f"{out['best_score']:.3f}" in out["message"] and "no model was called" in out["message"]
    assert out["flags"] == ["no_context"] and out["citations"] == []
    assert out["timings"]["generation_ms"] == 0.0
    assert openai_server.calls() == [] and not chat_rows(model).exists()
    assert not LlmCall.objects.filter(operation="chat").exists()


def test_invented_citation_is_removed_and_flagged(sample_kb, answer_with):
    model = answer_with("We have to fear fear itself [1]. The Moon landing was in 1969 [7].")
    out = rag.rag_query(knowledge_base=sample_kb, question=FEAR, model=model, k=3)
    assert out["invalid_citations"] == [7] and "invalid_citation" in out["flags"]
    assert "[7]" not in out["answer"] and "[1]" in out["answer"]
    assert out["raw_answer"].endswith("[7].")
    assert out["grounded"] is False  # the second sentence no longer cites anything
    second = out["sentences"][1]
    assert second["citations"] == [] and second["support"] == 0.0
    assert 0 < out["faithfulness"] < 1


def test_filters_and_hybrid_per_query(sample_kb):
    plain = rag.rag_retrieve(knowledge_base=sample_kb, question=FEAR, k=3)
    assert plain.mode == "exact" and chunk_key(plain.contexts[0]) == FEAR_CHUNK
    hybrid = rag.rag_retrieve(knowledge_base=sample_kb, question=FEAR, k=3, hybrid=True)
    assert hybrid.mode == "hybrid" and chunk_key(hybrid.contexts[0]) == FEAR_CHUNK
    assert hybrid.contexts[0].lexical_rank == 1  # "fear" is rare: BM25 agrees
    only_rights = rag.rag_retrieve(
        knowledge_base=sample_kb, question=FEAR, k=3, filters={"topic": "rights"}
    )
    assert {c.document_external_id for c in only_rights.contexts} == {
        "declarations/droits-de-l-homme-1789"
    }


def test_bad_query_input_is_refused(sample_kb):
    for kwargs in ({"question": " "}, {"question": "x", "k": 0}, {"question": "x", "threshold": 2}):
        with pytest.raises(InvalidInput):
            rag.rag_retrieve(knowledge_base=sample_kb, **kwargs)
    assert (
        not LlmCall.objects.filter(operation="embeddings", cached=False)
        .exclude(object_id=str(sample_kb.pk))
        .exists()
    )


def test_a_knowledge_base_without_an_index_cannot_be_queried(
    sample_corpus, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False):
        kb = rag.knowledge_base_create(name="Later", corpus_ids=[sample_corpus.pk], user=None)
    with pytest.raises(Conflict):
        rag.rag_retrieve(knowledge_base=kb, question=FEAR)


# --- Updates ----------------------------------------------------------------------------------

NEW_DOC = {
    "schema_version": "2",
    "id": "speeches/lighthouse-note",
    "title": "Keeper's note",
    "text": "The lighthouse keeper lit the lamp at dusk. Ships rounding the cape saw its beam.",
    "chunks": [
        {
            "position": 0,
            "text": "The lighthouse keeper lit the lamp at dusk.",
            "start_char": 0,
            "end_char": 43,
        },
        {
            "position": 1,
            "text": "Ships rounding the cape saw its beam.",
            "start_char": 44,
            "end_char": 81,
        },
    ],
}


@pytest.fixture
def embed_spy(monkeypatch):
    calls: list[int] = []
    real = gateway.embed

    def spy(**kwargs):
        calls.append(len(kwargs["input"]))
        return real(**kwargs)

    monkeypatch.setattr(gateway, "embed", spy)
    return calls


def update(kb: KnowledgeBase) -> KnowledgeBase:
    rag.knowledge_base_request_update(knowledge_base=kb)
    return build(kb)


def test_adding_a_document_embeds_only_its_chunks_and_finds_it(sample_kb, sample_corpus, embed_spy):
    corpus_services.corpus_upload(
        corpus=sample_corpus, upload=io.BytesIO(json.dumps(NEW_DOC).encode() + b"\n"), user=None
    )
    kb = update(sample_kb)
    assert embed_spy == [2]  # one batch, the two new chunks; the 15 others untouched
    assert kb.last_build["embedded"] == 2 and kb.last_build["unchanged"] == 15
    assert kb.version == 2 and kb.chunk_count == 17 and kb.document_count == 5
    assert len(kb.manifest["segments"]) == 2
    found = rag.rag_retrieve(knowledge_base=kb, question="Who lit the lamp in the lighthouse?")
    assert chunk_key(found.contexts[0]) == ("speeches/lighthouse-note", 0)


def test_removing_a_document_drops_it_at_once(sample_kb, sample_corpus, embed_spy):
    document = Document.objects.get(external_id="speeches/first-inaugural-1933")
    corpus_services.corpus_document_delete(document=document)
    # Before any update: gone from the results (contexts are read back from the chunks).
    found = rag.rag_retrieve(knowledge_base=sample_kb, question=FEAR, k=15)
    assert "speeches/first-inaugural-1933" not in {c.document_external_id for c in found.contexts}
    assert len(found.contexts) == 13
    kb = update(sample_kb)
    assert embed_spy[-1:] != [0] and kb.last_build["embedded"] == 0
    assert kb.last_build["tombstoned"] == 2 and kb.tombstone_count == 2
    assert kb.chunk_count == 13 and kb.document_count == 3
    (segment,) = kb.manifest["segments"]
    assert len(segment["tombstones"]) == 2  # tombstones before compaction
    assert KnowledgeBaseEntry.objects.filter(knowledge_base=kb, tombstoned=True).count() == 2


def test_changed_chunk_is_embedded_again_and_compaction_keeps_the_rest(
    sample_kb, embed_spy, django_capture_on_commit_callbacks
):
    chunk = Chunk.objects.get(document__external_id="speeches/moon-speech", position=3)
    chunk.text = "The lunar programme was announced at Rice University in Houston."
    chunk.save()
    kb = update(sample_kb)
    assert embed_spy == [1] and kb.last_build["tombstoned"] == 1 and kb.chunk_count == 15
    found = rag.rag_retrieve(knowledge_base=kb, question="Where was the lunar programme announced?")
    assert found.contexts[0].chunk_id == chunk.pk
    # Most of the chunks removed: the update compacts into one segment without re-embedding.
    Chunk.objects.exclude(document__external_id="speeches/moon-speech").delete()
    embed_spy.clear()
    rag.knowledge_base_request_update(knowledge_base=kb)
    with django_capture_on_commit_callbacks(execute=True):  # the old files' removal
        kb = build(kb)
    assert embed_spy == [] and kb.last_build["compacted"] is True
    (segment,) = kb.manifest["segments"]
    assert segment["count"] == 4 and segment["tombstones"] == [] and kb.tombstone_count == 0
    old = sample_kb.manifest["segments"][0]
    assert not storage_exists(old["vectors"])  # files of the old segments are removed
    found = rag.rag_retrieve(knowledge_base=kb, question="Where was the lunar programme announced?")
    assert found.contexts[0].chunk_id == chunk.pk


def test_a_query_during_an_update_sees_the_previous_version(sample_kb, sample_corpus, monkeypatch):
    corpus_services.corpus_upload(
        corpus=sample_corpus, upload=io.BytesIO(json.dumps(NEW_DOC).encode() + b"\n"), user=None
    )
    seen = {}
    real = vindex.write_segment

    def write_then_query(*args, **kwargs):
        entry = real(*args, **kwargs)  # the new segment is in storage, not yet published
        mid = rag.rag_retrieve(knowledge_base=sample_kb, question="lighthouse keeper lamp", k=20)
        seen["version"] = mid.version
        seen["documents"] = {c.document_external_id for c in mid.contexts}
        seen["status"] = KnowledgeBase.objects.get(pk=sample_kb.pk).status
        return entry

    monkeypatch.setattr(vindex, "write_segment", write_then_query)
    kb = update(sample_kb)
    assert seen["status"] == "updating" and seen["version"] == 1
    assert "speeches/lighthouse-note" not in seen["documents"]
    assert kb.version == 2
    after = rag.rag_retrieve(knowledge_base=kb, question="lighthouse keeper lamp", k=3)
    assert after.version == 2 and after.contexts[0].document_external_id == NEW_DOC["id"]


def test_loaded_indexes_are_cached_per_version(sample_kb, sample_corpus):
    rag.rag_retrieve(knowledge_base=sample_kb, question=FEAR)
    rag.rag_retrieve(knowledge_base=sample_kb, question=FEAR)
    assert vindex.cache.loads == 1
    corpus_services.corpus_upload(
        corpus=sample_corpus, upload=io.BytesIO(json.dumps(NEW_DOC).encode() + b"\n"), user=None
    )
    kb = update(sample_kb)
    # The caller still holds the version-1 row: the query reads the row and loads version 2.
    found = rag.rag_retrieve(knowledge_base=sample_kb, question="lighthouse keeper")
    assert found.version == kb.version == 2 and vindex.cache.loads == 2
    assert [key[1] for key in vindex.cache.items] == [2]  # the stale version is dropped


def test_failed_build_is_reported(sample_corpus, django_capture_on_commit_callbacks, monkeypatch):
    with django_capture_on_commit_callbacks(execute=False):
        kb = rag.knowledge_base_create(name="Broken", corpus_ids=[sample_corpus.pk], user=None)

    def down(**kwargs):
        raise gateway.ProviderError("scripted outage", transient=True)

    monkeypatch.setattr(gateway, "embed", down)
    done = rag.knowledge_base_refresh(kb_id=kb.pk)
    assert done.status == "failed" and "scripted outage" in done.error and done.version == 0
    assert done.claimed_by == ""


def test_approximate_index_above_the_threshold(sample_kb, sample_corpus, monkeypatch):
    monkeypatch.setattr(vindex, "ANN_THRESHOLD", 10)
    corpus_services.corpus_upload(
        corpus=sample_corpus, upload=io.BytesIO(json.dumps(NEW_DOC).encode() + b"\n"), user=None
    )
    kb = update(sample_kb)
    assert kb.is_approximate and storage_exists(kb.manifest["ann"]["path"])
    assert kb.recall_at_10 is not None and kb.recall_at_10 >= 0.95
    assert kb.size_bytes > sum(s["bytes"] for s in kb.manifest["segments"])
    found = rag.rag_retrieve(knowledge_base=kb, question=FEAR, k=3)
    assert found.mode == "approximate" and chunk_key(found.contexts[0]) == FEAR_CHUNK


def test_ad_hoc_texts_are_added_and_found(sample_kb, embed_spy):
    out = rag.knowledge_base_add_texts(
        knowledge_base=sample_kb,
        texts=[
            "Crucible's RAG explorer answers questions with cited sources.",
            {
                "text": "Penguins huddle together to survive the Antarctic winter.",
                "title": "Penguins",
            },
        ],
        user=None,
    )
    assert embed_spy == [2] and out["embedded"] == 2 and out["version"] == 2
    kb = KnowledgeBase.objects.get(pk=sample_kb.pk)
    assert kb.chunk_count == 17 and kb.corpora.count() == 2
    found = rag.rag_retrieve(knowledge_base=kb, question="How do penguins survive the winter?")
    assert found.contexts[0].chunk_id == out["chunk_ids"][1]
    assert found.contexts[0].document_title == "Penguins"
    with pytest.raises(InvalidInput):
        rag.knowledge_base_add_texts(knowledge_base=kb, texts=["ok", ""], user=None)
    assert KnowledgeBase.objects.get(pk=kb.pk).chunk_count == 17


def test_delete_removes_the_row_and_its_files(sample_kb, django_capture_on_commit_callbacks):
    paths = vindex.manifest_paths(sample_kb.manifest)
    with django_capture_on_commit_callbacks(execute=True):
        rag.knowledge_base_delete(knowledge_base=sample_kb)
    assert not KnowledgeBase.objects.exists() and not KnowledgeBaseEntry.objects.exists()
    assert paths and not any(storage_exists(p) for p in paths)


# --- Grounding (unit) -------------------------------------------------------------------------


def test_citation_check_and_support_scores():
    sources = {1: "The cat sat on the warm mat.", 2: "Dogs bark at the postman every morning."}
    g = grounding.check_answer("The cat sat on the mat [1]. Dogs bark at postmen [2][3].", sources)
    assert g.invalid_citations == [3] and g.citations == [1, 2]
    assert g.answer == "The cat sat on the mat [1]. Dogs bark at postmen [2]."
    assert [s.citations for s in g.sentences] == [[1], [2]]
    assert g.sentences[0].support == 1.0  # cat, sat, mat all in source 1
    assert g.sentences[1].support == pytest.approx(2 / 3)  # dogs, bark (not "postmen")
    assert g.grounded is True and g.faithfulness == pytest.approx((1 + 2 / 3) / 2)
    wrong = grounding.check_answer("The cat sat on the mat [2].", sources)
    assert wrong.sentences[0].support == 0.0 and not wrong.grounded
    assert "unsupported_sentence" in wrong.flags
    multi = grounding.check_answer("Cats and dogs [1, 2, 9].", sources)
    assert multi.answer == "Cats and dogs [1, 2]." and multi.invalid_citations == [9]
    none = grounding.check_answer("I do not know.", sources)
    assert none.flags == ["no_citation", "unsupported_sentence"] and none.faithfulness == 0.0


def test_a_build_whose_worker_died_is_queued_again(sample_corpus, monkeypatch, settings):
    from datetime import timedelta

    from django.utils import timezone

    from corpora import tasks

    queued: list[str] = []
    monkeypatch.setattr(tasks.knowledge_base_build_task, "delay", queued.append)
    long_ago = timezone.now() - timedelta(seconds=settings.LONG_TASK_STALE_AFTER_S + 60)
    dead = KnowledgeBase.objects.create(
        name="Dead", claimed_by="host:1:abc", heartbeat_at=long_ago, attempts=1
    )
    alive = KnowledgeBase.objects.create(
        name="Alive", claimed_by="host:2:def", heartbeat_at=timezone.now(), attempts=1
    )
    spent = KnowledgeBase.objects.create(
        name="Spent", claimed_by="host:3:ghi", heartbeat_at=long_ago, attempts=99
    )
    out = tasks.recover_knowledge_bases()
    assert out == {"requeued": [str(dead.pk)], "failed": [str(spent.pk)]}
    assert queued == [str(dead.pk)]
    dead.refresh_from_db()
    assert dead.claimed_by == "" and dead.status == "building"
    alive.refresh_from_db()
    assert alive.claimed_by == "host:2:def"
    spent.refresh_from_db()
    assert spent.status == "failed" and spent.claimed_by == ""
    # The requeued build claims the row again and completes.
    dead.corpora.add(sample_corpus)
    assert build(dead).version == 1


def test_segments_live_in_s3_in_production_mode(
    s3_storage, sample_corpus, django_capture_on_commit_callbacks
):
    from config.storage import storage_is_s3

    assert storage_is_s3()
    with django_capture_on_commit_callbacks(execute=False):
        kb = rag.knowledge_base_create(name="On S3", corpus_ids=[sample_corpus.pk], user=None)
    kb = build(kb)
    (segment,) = kb.manifest["segments"]
    assert storage_exists(segment["vectors"]) and storage_exists(segment["ids"])
    found = rag.rag_retrieve(knowledge_base=kb, question=FEAR)
    assert chunk_key(found.contexts[0]) == FEAR_CHUNK
    with django_capture_on_commit_callbacks(execute=True):
        rag.knowledge_base_delete(knowledge_base=kb)
    assert not storage_exists(segment["vectors"]) and not storage_exists(segment["ids"])


def test_response_profile_shapes_the_answer_request(sample_kb, answer_with, openai_server):
    from jobs.models import ResponseProfile

    ResponseProfile.objects.create(
        name="terse",
        version=2,
        title="Terse",
        target_words=20,
        max_tokens=48,
        register="formal",
        persona="Answer in one formal sentence.",
        temperature=0.2,
        source_path="jobs/profiles/terse.v2.yaml",
        checksum="0" * 64,
    )
    model = answer_with("Fear itself [1].")
    out = rag.rag_query(knowledge_base=sample_kb, question=FEAR, model=model, profile="terse")
    (call,) = openai_server.calls()
    assert call.body["max_tokens"] == 48 and call.body["temperature"] == 0.2
    assert call.body["messages"][0]["content"].startswith("Answer in one formal sentence.")
    assert out["profile"] == "terse@v2"
    with pytest.raises(InvalidInput):
        rag.rag_query(knowledge_base=sample_kb, question=FEAR, model=model, profile="nope")
    assert len(openai_server.calls()) == 1
