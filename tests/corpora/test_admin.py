"""Every corpora model is visible in the admin."""

import io

import pytest
from django.test import Client
from django.urls import reverse

from config.roles import Role
from corpora.services import corpus_create, export_create
from tests.corpora.conftest import document, jsonl
from tests.factories import UserFactory


@pytest.mark.parametrize(
    "model", ["corpus", "corpusingestion", "document", "chunk", "trainingfile", "export"]
)
def test_admin_lists_and_shows(db, model):
    corpus = corpus_create(name="c", upload=io.BytesIO(jsonl(document(1))), user=None)
    export_create(user=None, corpus=corpus, formats=["csv"])
    client = Client()
    client.force_login(UserFactory(role=Role.ADMIN))
    listing = client.get(reverse(f"admin:corpora_{model}_changelist"))
    assert listing.status_code == 200, model
    objects = {
        "corpus": corpus,
        "corpusingestion": corpus.ingestions.first(),
        "document": corpus.documents.first(),
        "chunk": corpus.chunks.first(),
        "export": corpus.exports.first(),
    }
    if model in objects:
        page = client.get(reverse(f"admin:corpora_{model}_change", args=[objects[model].pk]))
        assert page.status_code == 200, model
