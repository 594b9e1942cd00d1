"""Builders shared by the corpora tests: records, JSONL bytes and upload helpers."""

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from config.roles import Role

# The headless-Chromium fixtures, for test_datasets_browser.py.
from tests.browser.test_dashboard_browser import ada, browser, driver  # noqa: F401

TEXT = (
    "We choose to go to the Moon in this decade and do the other things, not because "
    "they are easy, but because they are hard."
)


def document(i: int, **overrides) -> dict:
    """A valid v2 corpus record with two chunks whose offsets match the text."""
    text = f"{TEXT} Document number {i}."
    cut = text.index(" not because")
    record = {
        "id": f"doc-{i}",
        "title": f"Speech {i}",
        "text": text,
        "document_type": "speech" if i % 2 else "op-ed",
        "author": "J. F. Kennedy",
        "date": "1962-09-12",
        "language": "en",
        "source": {"name": "Archive", "url": "https://example.org/speech"},
        "metadata": {"topic": "space" if i % 3 else "economy", "year": 1962, "tags": ["moon"]},
        "extensions": {
            "narrative": {"speaker": "Kennedy", "medium": "speech", "audience": "Rice"},
            "quality": {"score": 4.0 + (i % 2) / 2},
        },
        "chunks": [
            {
                "position": 0,
                "text": text[:cut],
                "token_count": 20,
                "start_char": 0,
                "end_char": cut,
            },
            {
                "position": 1,
                "text": text[cut + 1 :],
                "start_char": cut + 1,
                "end_char": len(text),
                "metadata": {"part": "second"},
            },
        ],
    }
    record.update(overrides)
    return record


def document_v1(i: int, **overrides) -> dict:
    record = {
        "text_id": f"old-{i}",
        "title": f"Old speech {i}",
        "content": f"{TEXT} Old number {i}.",
        "doc_type": "speech",
        "lang": "en",
        "source_url": "https://example.org/old",
        "speaker": "Kennedy",
        "medium": "speech",
        "meta": {"topic": "space"},
        "chunks": [{"chunk_id": 0, "content": "We choose to go to the Moon", "tokens": 7}],
    }
    record.update(overrides)
    return record


def jsonl(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def upload_corpus(client, content: bytes, name="speeches", **form):
    return client._client.post(
        "/api/v1/corpora/upload",
        data={"file": SimpleUploadedFile("speeches.jsonl", content), "name": name, **form},
        headers=client._headers,
    )


@pytest.fixture
def engineer(api_as):
    return api_as(Role.ENGINEER)


@pytest.fixture
def viewer(api_as):
    return api_as(Role.VIEWER)


@pytest.fixture(autouse=True)
def media(settings, tmp_path):
    """Files go to a fresh folder per test, so tests can see exactly what was stored."""
    root = tmp_path / "media"
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(root), "base_url": "/media/"},
        },
    }
    return root


def stored_files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
