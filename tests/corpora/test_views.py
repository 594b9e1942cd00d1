"""The Datasets pages: lists, detail pages, upload through the dashboard, exports."""

import io

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from config.roles import Role
from corpora.models import Corpus, Export, TrainingFile
from corpora.services import corpus_create, export_create, training_file_create
from corpora.tasks import export_run_task
from tests.corpora.conftest import document, jsonl
from tests.factories import UserFactory

CONVERSATION = (
    b'{"id": "c1", "messages": [{"role": "user", "content": "Hi"}, '
    b'{"role": "assistant", "content": "Hello!"}], "metadata": {"quality_score": 4}}\n'
)


def signed_in(role=Role.ENGINEER) -> Client:
    client = Client()
    client.force_login(UserFactory(role=role))
    return client


@pytest.fixture
def corpus(db):
    return corpus_create(
        name="speeches", upload=io.BytesIO(jsonl(*(document(i) for i in range(30)))), user=None
    )


def test_index_lists_corpora_and_training_files(corpus):
    training_file_create(name="chat", upload=io.BytesIO(CONVERSATION), user=None)
    page = signed_in().get(reverse("corpora:index"))
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="corpora-table"' in html and "speeches" in html and 'id="upload-form"' in html
    assert 'id="training-files-table"' in html and "chat" in html
    assert page.context["section"] == "datasets"
    lists = signed_in().get(
        reverse("corpora:index"), {"part": "lists"}, headers={"HX-Request": "true"}
    )
    assert 'id="corpora-table"' in lists.content.decode() and b"<h1" not in lists.content


def test_viewers_see_no_upload_form_and_cannot_post(corpus):
    viewer = signed_in(Role.VIEWER)
    assert 'id="upload-form"' not in viewer.get(reverse("corpora:index")).content.decode()
    response = viewer.post(
        reverse("corpora:upload"),
        {"kind": "corpus", "file": SimpleUploadedFile("c.jsonl", jsonl(document(1)))},
    )
    assert response.status_code == 403
    assert Corpus.objects.count() == 1


def test_anonymous_is_sent_to_sign_in(db):
    response = Client().get(reverse("corpora:index"))
    assert response.status_code == 302 and "/login/" in response["Location"]


def test_dashboard_upload_of_a_corpus_and_a_training_file(db):
    client = signed_in()
    response = client.post(
        reverse("corpora:upload"),
        {
            "kind": "corpus",
            "name": "from the dashboard",
            "schema_version": "2",
            "file": SimpleUploadedFile("c.jsonl", jsonl(document(1), document(2))),
        },
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 201
    assert 'id="upload-ok"' in response.content.decode()
    assert Corpus.objects.get().name == "from the dashboard"
    response = client.post(
        reverse("corpora:upload"),
        {"kind": "training_file", "file": SimpleUploadedFile("chat.jsonl", CONVERSATION)},
    )
    assert response.status_code == 201 and TrainingFile.objects.get().name == "chat"


def test_dashboard_upload_shows_the_errors_by_line(db):
    response = signed_in().post(
        reverse("corpora:upload"),
        {"kind": "corpus", "file": SimpleUploadedFile("c.jsonl", jsonl(document(1)) + b"{bad\n")},
    )
    assert response.status_code == 422
    html = response.content.decode()
    assert 'id="upload-errors"' in html and "Nothing was stored." in html and "invalid JSON" in html
    assert Corpus.objects.count() == 0


def test_corpus_page_tabs_filters_and_query_count(corpus):
    client = signed_in()
    url = reverse("corpora:corpus", args=[corpus.pk])
    page = client.get(url)
    assert page.status_code == 200 and 'id="documents-table"' in page.content.decode()
    with CaptureQueriesContext(connection) as queries:
        client.get(url)
    assert len(queries) < 15
    filtered = client.get(
        url, {"meta": "topic:economy", "part": "table"}, headers={"HX-Request": "true"}
    )
    html = filtered.content.decode()
    assert "<h1" not in html and html.count("<tr>") == 1 + 10  # header + documents 0,3,...,27
    chunks = client.get(url, {"tab": "chunks", "document": "doc-4"})
    assert 'id="chunks-table"' in chunks.content.decode()
    assert len(chunks.context["page"].object_list) == 2
    with CaptureQueriesContext(connection) as queries:
        client.get(url, {"tab": "chunks"})
    assert len(queries) < 15
    bad = client.get(url, {"meta": "not a key"})
    assert "meta:" in bad.content.decode()
    assert client.get(url, {"tab": "uploads"}).status_code == 200
    assert client.get(url, {"tab": "exports"}).status_code == 200


def test_document_page_shows_metadata_extensions_and_chunks(corpus):
    doc = corpus.documents.get(external_id="doc-1")
    page = signed_in(Role.VIEWER).get(reverse("corpora:document", args=[corpus.pk, doc.pk]))
    html = page.content.decode()
    assert page.status_code == 200
    assert 'id="document-metadata"' in html and "topic" in html and "narrative" in html
    assert html.count('class="chunk-item"') == 2
    assert signed_in().get(reverse("corpora:document", args=[corpus.pk, 999999])).status_code == 404


def test_training_file_page(db):
    training_file = training_file_create(name="chat", upload=io.BytesIO(CONVERSATION), user=None)
    page = signed_in().get(reverse("corpora:training_file", args=[training_file.pk]))
    assert page.status_code == 200 and "Length distribution" in page.content.decode()


def test_export_from_the_dashboard(corpus, django_capture_on_commit_callbacks):
    client = signed_in()
    page = client.get(reverse("corpora:exports"), {"source": f"corpus:{corpus.pk}"})
    assert 'id="export-form"' in page.content.decode()
    with django_capture_on_commit_callbacks(execute=False):
        response = client.post(
            reverse("corpora:export_new"),
            {
                "source": f"corpus:{corpus.pk}",
                "formats": ["csv", "hf"],
                "train": 70,
                "validation": 20,
                "test": 10,
                "seed": 5,
                "stratify_by": "document_type",
                "csv_delimiter": ";",
                "csv_encoding": "utf-8-sig",
            },
        )
    export = Export.objects.get()
    assert response.status_code == 302 and response["Location"].endswith(f"/exports/{export.pk}/")
    assert export.parameters["splits"] == {"train": 0.7, "validation": 0.2, "test": 0.1}
    running = client.get(reverse("corpora:export", args=[export.pk]))
    assert 'hx-trigger="every' in running.content.decode()
    export_run_task(str(export.pk))
    done = client.get(reverse("corpora:export", args=[export.pk])).content.decode()
    assert 'id="export-files"' in done and "hf/README.md" in done and 'id="download-all"' in done


def test_bad_export_form_says_why(corpus):
    response = signed_in().post(
        reverse("corpora:export_new"),
        {
            "source": f"corpus:{corpus.pk}",
            "formats": ["csv"],
            "train": 50,
            "validation": 10,
            "test": 10,
            "seed": 1,
        },
    )
    assert response.status_code == 422
    assert "the ratios add up to 0.7, not 1" in response.content.decode()
    assert Export.objects.count() == 0


def test_exports_list_has_no_n_plus_one(corpus):
    client = signed_in()
    export_create(user=None, corpus=corpus, formats=["csv"])
    client.get(reverse("corpora:exports"))
    with CaptureQueriesContext(connection) as one:
        client.get(reverse("corpora:exports"))
    for _ in range(4):
        export_create(user=None, corpus=corpus, formats=["csv"])
    with CaptureQueriesContext(connection) as five:
        client.get(reverse("corpora:exports"))
    assert len(five) == len(one)
