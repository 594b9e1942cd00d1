# ruff: noqa: F811 (pytest fixtures imported from test_rag are parameters here)
"""RAG routes (/api/v1/rag/..., and /v1/rag/... on the public API) and the RAG explorer page:
authorization for every route, bad input refused without writes, the JSON shapes."""

import importlib.util
import uuid

import pytest
from django.test import Client
from django.urls import reverse

from billing.models import LlmCall
from config.roles import Role
from corpora.models import KnowledgeBase
from corpora.rag import services as rag
from tests.conftest import assert_envelope
from tests.corpora.test_rag import (  # noqa: F401
    FEAR,
    FEAR_CHUNK,
    _offline,
    answer_with,
    build,
    chunk_key,
    sample_corpus,
    sample_kb,
)
from tests.factories import UserFactory

pytest_plugins = ["tests.jobs.openai_server"]
pytestmark = pytest.mark.django_db

MISSING = "00000000-0000-4000-8000-000000000000"
# The public /v1/ API is issue 15's (jobs/public_api.py); the RAG routes join it when it exists.
PREFIXES = ["/api/v1/"] + (["/v1/"] if importlib.util.find_spec("jobs.public_api") else [])


def routes(kb_id: str) -> list[tuple[str, str, dict | None, bool]]:
    """(method, path, body, is_write) for every RAG route."""
    return [
        ("POST", "rag/indexes", {"name": "x", "corpora": [MISSING]}, True),
        ("GET", "rag/indexes", None, False),
        ("GET", f"rag/indexes/{kb_id}", None, False),
        ("POST", f"rag/indexes/{kb_id}/update", None, True),
        ("DELETE", f"rag/indexes/{kb_id}", None, True),
        ("POST", "rag/query", {"index": kb_id, "question": "q"}, True),
    ]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_every_route_needs_a_token_and_writes_need_run_jobs(
    prefix, anon_api, api_as, sample_corpus
):
    kb = KnowledgeBase.objects.create(name="KB")  # never built: reads still answer
    kb.corpora.add(sample_corpus)
    viewer = api_as(Role.VIEWER)
    for method, path, body, is_write in routes(str(kb.pk)):
        url = prefix + path
        assert_envelope(anon_api.request(method, url, json=body), 401, "not_authenticated")
        response = viewer.request(method, url, json=body)
        if is_write:
            assert_envelope(response, 403, "permission_denied")
        else:
            assert response.status_code == 200, (url, response.content)
    assert KnowledgeBase.objects.count() == 1 and not LlmCall.objects.exists()


def test_create_returns_at_once_and_the_build_is_queued(
    api_as, sample_corpus, django_capture_on_commit_callbacks
):
    engineer = api_as(Role.ENGINEER)
    with django_capture_on_commit_callbacks(execute=False) as queued:
        response = engineer.post(
            "rag/indexes",
            json={"name": "Speeches", "corpora": [str(sample_corpus.pk)], "filter": {}},
        )
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["status"] == "building" and body["version"] == 0 and len(queued) == 1
    assert body["corpora"] == [{"id": str(sample_corpus.pk), "name": "Speeches"}]
    assert body["embedding_model"] == "offline/all-minilm-l6-v2" and body["search"] == "exact"
    build(KnowledgeBase.objects.get(pk=body["id"]))
    got = engineer.get(f"rag/indexes/{body['id']}").json()
    assert got["status"] == "ready" and got["chunk_count"] == 15 and got["dimensions"] == 384
    assert got["size_bytes"] > 0 and len(got["checksum"]) == 64 and got["built_at"]
    listed = engineer.get("rag/indexes").json()
    assert [kb["id"] for kb in listed] == [body["id"]]


def test_bad_index_input_is_refused_and_writes_nothing(api_as, sample_corpus):
    engineer = api_as(Role.ENGINEER)
    for payload, status in [
        ({"name": "x", "corpora": []}, 422),
        ({"name": "", "corpora": [str(sample_corpus.pk)]}, 422),
        ({"name": "x", "corpora": [MISSING]}, 422),
        ({"name": "x", "corpora": ["not-a-uuid"]}, 422),
        ({"name": "x", "corpora": [str(sample_corpus.pk)], "embedding_model": "nope/x"}, 422),
        ({"name": "x", "corpora": [str(sample_corpus.pk)], "filter": {"k": {"n": 1}}}, 422),
    ]:
        assert_envelope(engineer.post("rag/indexes", json=payload), status)
    assert not KnowledgeBase.objects.exists()
    assert_envelope(engineer.get(f"rag/indexes/{MISSING}"), 404, "not_found")
    assert_envelope(engineer.post(f"rag/indexes/{MISSING}/update"), 404, "not_found")
    assert_envelope(engineer.request("DELETE", f"rag/indexes/{MISSING}"), 404, "not_found")


def test_query_answers_with_citations_over_both_prefixes(api_as, sample_kb, answer_with):
    model = answer_with("Fear itself is the only thing to fear [1].")
    engineer = api_as(Role.ENGINEER)
    for prefix in PREFIXES:
        response = engineer.post(
            prefix + "rag/query",
            json={"index": str(sample_kb.pk), "question": FEAR, "k": 3, "model": model},
        )
        assert response.status_code == 200, response.content
        body = response.json()
        assert chunk_key(body["contexts"][0]) == FEAR_CHUNK
        assert body["citations"][0]["chunk_id"] == body["contexts"][0]["chunk_id"]
        assert body["grounded"] is True and body["no_context"] is False
        assert set(body["timings"]) == {"retrieval_ms", "generation_ms"}
    off = engineer.post(
        "rag/query", json={"index": str(sample_kb.pk), "question": "Best pizza dough recipe?"}
    ).json()
    assert off["no_context"] is True and off["answer"] == "No relevant context found"


def test_bad_query_input_is_refused(api_as, sample_kb):
    engineer = api_as(Role.ENGINEER)
    for payload in [
        {"index": str(sample_kb.pk), "question": ""},
        {"index": str(sample_kb.pk), "question": "q", "k": 0},
        {"index": str(sample_kb.pk), "question": "q", "threshold": 3},
        {"index": str(sample_kb.pk), "question": "q", "filters": {"a": [1]}},
    ]:
        assert_envelope(engineer.post("rag/query", json=payload), 422)
    assert_envelope(engineer.post("rag/query", json={"index": MISSING, "question": "q"}), 404)
    assert not LlmCall.objects.filter(operation="chat").exists()


def test_update_and_delete(api_as, sample_kb, django_capture_on_commit_callbacks):
    engineer = api_as(Role.ENGINEER)
    with django_capture_on_commit_callbacks(execute=False) as queued:
        response = engineer.post(f"rag/indexes/{sample_kb.pk}/update")
    assert response.status_code == 202 and response.json()["status"] == "updating"
    assert len(queued) == 1
    kb = build(sample_kb)
    assert kb.version == 2 and kb.last_build["embedded"] == 0
    response = engineer.request("DELETE", f"rag/indexes/{kb.pk}")
    assert response.status_code == 204 and not KnowledgeBase.objects.exists()


# --- The page ---------------------------------------------------------------------------------


def client_as(role):
    client = Client()
    client.force_login(UserFactory(role=role))
    return client


def test_page_needs_a_signed_in_role(sample_kb):
    url = reverse("corpora:rag")
    response = Client().get(url)
    assert response.status_code == 302 and "/login/" in response["Location"]
    assert client_as(None).get(url).status_code == 403
    page = client_as(Role.VIEWER).get(url)
    assert page.status_code == 200
    html = page.content.decode()
    assert "Speeches KB" in html and "needs the engineer role" in html
    assert 'id="ask-form"' not in html and 'id="kb-form"' not in html


def test_page_writes_are_refused_to_viewers(sample_kb, sample_corpus):
    viewer = client_as(Role.VIEWER)
    posts = [
        (reverse("corpora:rag_retrieve"), {"kb": sample_kb.pk, "question": FEAR}),
        (reverse("corpora:rag_generate"), {"kb": sample_kb.pk, "question": FEAR}),
        (reverse("corpora:rag_index_create"), {"name": "x", "corpora": [sample_corpus.pk]}),
        (reverse("corpora:rag_index_update", args=[sample_kb.pk]), {}),
        (reverse("corpora:rag_index_delete", args=[sample_kb.pk]), {}),
    ]
    for url, data in posts:
        assert viewer.post(url, data).status_code == 403, url
        anon = Client().post(url, data)
        assert anon.status_code == 302 and "/login/" in anon["Location"], url
    assert KnowledgeBase.objects.count() == 1 and KnowledgeBase.objects.get().version == 1


def test_page_ask_is_two_requests_retrieve_then_generate(sample_kb, answer_with):
    model = answer_with("The only thing to fear is fear itself [1]. Also [9].")
    engineer = client_as(Role.ENGINEER)
    page = engineer.get(reverse("corpora:rag")).content.decode()
    assert 'id="ask-form"' in page and "Retrieving context…" in page
    retrieved = engineer.post(
        reverse("corpora:rag_retrieve"),
        {"kb": sample_kb.pk, "question": FEAR, "k": 3, "threshold": 0.3, "model": model},
        headers={"HX-Request": "true"},
    ).content.decode()
    assert 'id="generating"' in retrieved and "Generating the answer" in retrieved
    assert not LlmCall.objects.filter(operation="chat").exists()  # nothing generated yet
    top = rag.rag_retrieve(knowledge_base=sample_kb, question=FEAR, k=3)
    answer = engineer.post(
        reverse("corpora:rag_generate"),
        {
            "kb": sample_kb.pk,
            "question": FEAR,
            "model": model,
            "threshold": 0.3,
            "chunks": "[" + ",".join(f"[{c.chunk_id}, {c.score}]" for c in top.relevant) + "]",
            "mode": "exact",
            "retrieval_ms": 12,
        },
        headers={"HX-Request": "true"},
    ).content.decode()
    assert 'href="#evidence-1"' in answer and 'id="evidence-1"' in answer
    assert 'id="invalid-citations"' in answer and "[9]" in answer  # flagged, not linked
    assert 'href="#evidence-9"' not in answer
    assert "First Inaugural Address (excerpt)" in answer and "characters 284\u2013479" in answer
    assert LlmCall.objects.filter(operation="chat", model=model).count() == 1


def test_page_no_context_state(sample_kb):
    engineer = client_as(Role.ENGINEER)
    html = engineer.post(
        reverse("corpora:rag_retrieve"),
        {"kb": sample_kb.pk, "question": "How do I bake sourdough bread?"},
        headers={"HX-Request": "true"},
    ).content.decode()
    assert 'id="no-context"' in html and "No relevant context found" in html
    assert 'id="generating"' not in html and not LlmCall.objects.filter(operation="chat").exists()


def test_page_manages_knowledge_bases(sample_corpus, django_capture_on_commit_callbacks):
    engineer = client_as(Role.ENGINEER)
    with django_capture_on_commit_callbacks(execute=False) as queued:
        html = engineer.post(
            reverse("corpora:rag_index_create"),
            {"name": "From the page", "corpora": [sample_corpus.pk], "filter": "topic=space"},
            headers={"HX-Request": "true"},
        ).content.decode()
    assert "is building" in html and 'hx-trigger="every' in html and len(queued) == 1
    kb = KnowledgeBase.objects.get()
    assert kb.chunk_filter == {"topic": "space"} and kb.created_by is not None
    bad = engineer.post(
        reverse("corpora:rag_index_create"), {"name": "x"}, headers={"HX-Request": "true"}
    ).content.decode()
    assert "Choose at least one corpus" in bad and KnowledgeBase.objects.count() == 1
    kb = build(kb)
    assert kb.chunk_count == 4  # the moon speech's chunks
    with django_capture_on_commit_callbacks(execute=False):
        html = engineer.post(
            reverse("corpora:rag_index_update", args=[kb.pk]), headers={"HX-Request": "true"}
        ).content.decode()
    assert "is updating" in html
    html = engineer.post(
        reverse("corpora:rag_index_delete", args=[kb.pk]), headers={"HX-Request": "true"}
    ).content.decode()
    assert "was deleted" in html and not KnowledgeBase.objects.exists()


def test_page_query_count_does_not_grow_with_knowledge_bases(
    sample_corpus, django_assert_max_num_queries
):
    for i in range(6):
        kb = KnowledgeBase.objects.create(name=f"KB {i}", version=1, status="ready")
        kb.corpora.add(sample_corpus)
    engineer = client_as(Role.ENGINEER)
    engineer.get(reverse("corpora:rag"))  # warm the session and permission caches
    with django_assert_max_num_queries(12):
        response = engineer.get(reverse("corpora:rag"))
    assert response.status_code == 200 and "KB 5" in response.content.decode()
    assert str(uuid.UUID(str(kb.pk))) in response.content.decode()
