"""Browsing: corpora, documents and chunks with filters, pagination and query counts."""

import io

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from config.roles import Role
from corpora.services import corpus_create
from tests.conftest import assert_envelope
from tests.corpora.conftest import document, jsonl


@pytest.fixture
def corpus(db):
    records = [document(i) for i in range(12)]
    records[4]["metadata"] = {"topic": "space", "year": "1961", "speaker": {"party": "dem"}}
    records[5]["extensions"] = {"x-custom": {"anything": True}}
    return corpus_create(name="speeches", upload=io.BytesIO(jsonl(*records)), user=None)


def test_list_and_detail(api_as, corpus):
    viewer = api_as(Role.VIEWER)
    corpus_create(name="other", upload=io.BytesIO(jsonl(document(1))), user=None)
    listed = viewer.get("corpora").json()
    assert listed["count"] == 2
    first = listed["items"][1]
    assert first["name"] == "speeches" and first["record_count"] == 12
    assert {"created_at", "checksum", "status", "uploaded_by"} <= set(first)
    assert viewer.get("corpora?q=oth").json()["count"] == 1
    detail = viewer.get(f"corpora/{corpus.pk}").json()
    assert detail["stats"]["documents"] == 12 and len(detail["ingestions"]) == 1
    assert_envelope(viewer.get("corpora/00000000-0000-0000-0000-000000000000"), 404, "not_found")


def test_corpora_list_has_no_n_plus_one(api_as, corpus):
    viewer = api_as(Role.VIEWER)
    for i in range(3):
        corpus_create(name=f"c{i}", upload=io.BytesIO(jsonl(document(i))), user=viewer.user)
    viewer.get("corpora")  # warm the auth caches
    with CaptureQueriesContext(connection) as few:
        viewer.get("corpora?page_size=2")
    with CaptureQueriesContext(connection) as many:
        viewer.get("corpora?page_size=20")
    assert len(many) == len(few)


def test_documents_paginate_and_filter_on_fields_and_metadata(api_as, corpus):
    viewer = api_as(Role.VIEWER)
    page = viewer.get(f"corpora/{corpus.pk}/documents?page_size=5").json()
    assert page["count"] == 12 and len(page["items"]) == 5
    item = page["items"][0]
    assert item["id"] == "doc-0" and item["position"] == 0
    assert item["preview"].startswith("We choose to go") and "text" not in item
    assert item["extensions"]["narrative"]["speaker"] == "Kennedy"

    def ids(query):
        response = viewer.get(f"corpora/{corpus.pk}/documents?page_size=50&{query}")
        assert response.status_code == 200, response.content
        return [d["id"] for d in response.json()["items"]]

    assert ids("document_type=speech") == [f"doc-{i}" for i in range(1, 12, 2)]
    assert ids("meta=topic:economy") == ["doc-0", "doc-3", "doc-6", "doc-9"]
    # Numbers match numbers and strings alike; nested keys are dotted.
    assert ids("meta=year:1961") == ["doc-4"]
    assert len(ids("meta=year:1962")) == 11
    assert ids("meta=speaker.party:dem") == ["doc-4"]
    assert ids("meta=topic:space&meta=year:1961") == ["doc-4"]
    assert ids("ext=x-custom") == ["doc-5"]
    assert ids("ext=quality.score:4.5") == [f"doc-{i}" for i in range(1, 12, 2) if i != 5]
    assert ids("q=doc-1") == ["doc-1", "doc-10", "doc-11"]
    assert ids("meta=topic:nothing") == []
    # A key cannot smuggle an ORM lookup in.
    assert ids("meta=contains:x") == []
    assert ids("meta=a__b:1") == []  # a key, never a lookup
    error = assert_envelope(viewer.get(f"corpora/{corpus.pk}/documents?meta=a b:1"), 422)
    assert error["message"].startswith("meta:")
    assert_envelope(viewer.get(f"corpora/{corpus.pk}/documents?meta=:x"), 422)


def test_document_detail(api_as, corpus):
    viewer = api_as(Role.VIEWER)
    pk = corpus.documents.get(external_id="doc-2").pk
    body = viewer.get(f"corpora/{corpus.pk}/documents/{pk}").json()
    assert body["text"].endswith("Document number 2.") and body["line_number"] == 3
    assert body["source"]["url"] == "https://example.org/speech" and len(body["sha256"]) == 64
    assert_envelope(viewer.get(f"corpora/{corpus.pk}/documents/999999"), 404)


def test_chunks_filter_and_have_no_n_plus_one(api_as, corpus):
    viewer = api_as(Role.VIEWER)
    page = viewer.get(f"corpora/{corpus.pk}/chunks?page_size=50").json()
    assert page["count"] == 24
    first = page["items"][0]
    assert first["document_id"] == "doc-0" and first["position"] == 0
    assert first["token_count"] == 20 and first["end_char"] > 0
    doc = viewer.get(f"corpora/{corpus.pk}/chunks?document=doc-7").json()["items"]
    assert [c["position"] for c in doc] == [0, 1] and {c["document_id"] for c in doc} == {"doc-7"}
    assert viewer.get(f"corpora/{corpus.pk}/chunks?meta=part:second").json()["count"] == 12
    assert viewer.get(f"corpora/{corpus.pk}/chunks?min_tokens=20").json()["count"] == 12
    assert viewer.get(f"corpora/{corpus.pk}/chunks?max_tokens=19").json()["count"] == 12
    assert viewer.get(f"corpora/{corpus.pk}/chunks?q=Moon").json()["count"] == 12
    viewer.get(f"corpora/{corpus.pk}/chunks?page_size=2")
    with CaptureQueriesContext(connection) as few:
        viewer.get(f"corpora/{corpus.pk}/chunks?page_size=2")
    with CaptureQueriesContext(connection) as many:
        viewer.get(f"corpora/{corpus.pk}/chunks?page_size=24")
    assert len(many) == len(few)


def test_schema_catalogue(api_as):
    viewer = api_as(Role.VIEWER)
    entries = viewer.get("corpora/schemas").json()
    names = {(e["name"], e["version"]) for e in entries}
    assert {("corpus", "1"), ("corpus", "2"), ("training-file", "1")} <= names
    assert ("narrative-extension", "1") in names and ("quality-extension", "1") in names
    assert [e["version"] for e in entries if e["name"] == "corpus" and e["current"]] == ["2"]
    schema = viewer.get("corpora/schemas/corpus/2").json()
    assert schema["$id"].endswith("core.v2.json")
    assert viewer.get("corpora/schemas/narrative-extension/v1").status_code == 200
    assert_envelope(viewer.get("corpora/schemas/corpus/9"), 404)
