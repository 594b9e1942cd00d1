"""Every upload path refuses a file over UPLOAD_MAX_BYTES from its Content-Length, before the
body is read: a 413 envelope naming the limit on the API, an error panel or page on the
dashboard; nothing stored."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from config.middleware import format_bytes
from config.roles import Role
from corpora.models import Corpus, TrainingFile
from tests.corpora.conftest import stored_files
from tests.factories import TokenFactory, UserFactory

pytestmark = pytest.mark.django_db

LIMIT = 4096
BIG = b'{"id": "x", "text": "' + b"a" * (2 * LIMIT) + b'"}\n'


@pytest.fixture
def small_limit(settings, local_storage):
    settings.UPLOAD_MAX_BYTES = LIMIT
    return local_storage


@pytest.fixture(autouse=True)
def body_never_read(monkeypatch):
    """Proves the refusal comes before Django reads the body: reading it fails the test."""
    from django.http.multipartparser import MultiPartParser

    def refuse(self):
        raise AssertionError("the multipart body was read")

    monkeypatch.setattr(MultiPartParser, "parse", refuse)


def _token_client(role=Role.ENGINEER) -> tuple[Client, dict]:
    token = TokenFactory(user=UserFactory(role=role))
    return Client(), {"Authorization": f"Token {token.key}"}


@pytest.mark.parametrize(
    "path", ["/api/v1/corpora/upload", "/api/v1/training-files", "/v1/datasets"]
)
def test_api_uploads_over_the_limit_get_a_413_envelope(small_limit, path):
    client, headers = _token_client()
    response = client.post(
        path, data={"file": SimpleUploadedFile("big.jsonl", BIG), "name": "big"}, headers=headers
    )
    assert response.status_code == 413, response.content
    error = response.json()["error"]
    assert error["code"] == "upload_too_large"
    assert "the limit is 4 KiB per upload" in error["message"]
    assert error["details"]["limit_bytes"] == LIMIT and error["details"]["size_bytes"] > LIMIT
    assert error["request_id"]
    assert not small_limit.exists() or stored_files(small_limit) == []
    assert not Corpus.objects.exists() and not TrainingFile.objects.exists()


@pytest.mark.parametrize("kind", ["corpus", "training_file"])
def test_dashboard_upload_form_over_the_limit_shows_the_limit(small_limit, kind):
    client = Client()
    client.force_login(UserFactory(role=Role.ENGINEER))
    response = client.post(
        reverse("corpora:upload"),
        data={"file": SimpleUploadedFile("big.jsonl", BIG), "name": "big", "kind": kind},
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 413
    text = response.content.decode()
    assert 'id="upload-error"' in text and "the limit is 4 KiB per upload" in text
    assert not Corpus.objects.exists() and not TrainingFile.objects.exists()
    # Without htmx (a plain form post): the same message on an error page.
    page = client.post(
        reverse("corpora:upload"),
        data={"file": SimpleUploadedFile("big.jsonl", BIG), "name": "big", "kind": kind},
    )
    assert page.status_code == 413 and "Upload too large" in page.content.decode()
    assert "the limit is 4 KiB per upload" in page.content.decode()


def test_an_upload_under_the_limit_still_goes_through(small_limit, monkeypatch):
    monkeypatch.undo()  # the body may be read now
    client, headers = _token_client()
    small = b'{"id": "d1", "title": "T", "text": "hello world"}\n'
    response = client.post(
        "/api/v1/corpora/upload",
        data={"file": SimpleUploadedFile("ok.jsonl", small), "name": "ok"},
        headers=headers,
    )
    assert response.status_code != 413, response.content


def test_limits_are_named_readably():
    assert format_bytes(2 * 1024**3) == "2 GiB"
    assert format_bytes(64 * 1024**2) == "64 MiB"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(10) == "10 bytes"
