"""Training-file upload: schema validation with line numbers, statistics, nothing written
when invalid."""

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from config.roles import Role
from config.storage import storage_exists, storage_read
from corpora.models import TrainingFile
from tests.conftest import assert_envelope

SYSTEM = "You are Elena Morales, a warm financial advisor."


def conversation(i: int, **overrides) -> dict:
    record = {
        "id": f"c-{i}",
        "system_prompt": SYSTEM,
        "training_pairs": [
            {"user_input": f"Question {i}?", "target_response": f"Answer number {i}."},
            {"user_input": "Thanks!", "target_response": "You're welcome.", "quality_score": 4.5},
        ],
        "metadata": {"topic": "budgeting", "quality_score": 4.0 + i % 2 / 2},
    }
    record.update(overrides)
    return record


def jsonl(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def upload(client, content: bytes, name="advisor"):
    return client._client.post(
        "/api/v1/training-files",
        data={"file": SimpleUploadedFile("advisor.jsonl", content), "name": name},
        headers=client._headers,
    )


@pytest.fixture
def engineer(api_as):
    return api_as(Role.ENGINEER)


def test_valid_file_is_stored_with_statistics(engineer):
    messages_shape = {
        "id": "m-1",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello, how can I help?"},
        ],
    }
    content = b"\xef\xbb\xbf" + jsonl(conversation(1), conversation(2), messages_shape) + b"\n"
    response = upload(engineer, content)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "ready"
    assert body["conversation_count"] == 3 and body["pair_count"] == 5
    assert body["stats"]["quality_score"]["count"] == 2
    assert len(body["stats"]["preview"]) == 3
    stored = TrainingFile.objects.get(pk=body["id"])
    assert storage_exists(stored.storage_path)
    assert storage_read(stored.storage_path) == content
    assert stored.uploaded_by == engineer.user


@pytest.mark.parametrize(
    ("content", "line", "pointer", "fragment"),
    [
        (jsonl(conversation(1)) + b"{not json\n", 2, "", "invalid JSON"),
        (jsonl(conversation(1)) + b"\xff\xfe\n", 2, "", "invalid UTF-8"),
        (
            jsonl(
                conversation(1),
                conversation(2),
                conversation(3, training_pairs=[{"user_input": "Hi", "target_response": ""}]),
            ),
            3,
            "/training_pairs/0/target_response",
            "should be non-empty",
        ),
        (
            jsonl(conversation(1, training_pairs=[{"user_input": "Hi"}])),
            1,
            "/training_pairs/0",
            "'target_response' is a required property",
        ),
        (
            jsonl(
                {
                    "id": "x",
                    "messages": [
                        {"role": "user", "content": "a"},
                        {"role": "wizard", "content": "b"},
                    ],
                }
            ),
            1,
            "/messages/1/role",
            "'wizard' is not one of",
        ),
        (jsonl(conversation(1), conversation(1)), 2, "/id", "duplicate id 'c-1'"),
        (b"\n\n", 1, "", "no conversations"),
    ],
)
def test_broken_files_name_the_line_and_write_nothing(engineer, content, line, pointer, fragment):
    response = upload(engineer, content)
    error = assert_envelope(response, 422, "validation_error")
    first = error["details"]["errors"][0]
    assert first["line"] == line, first
    assert first["pointer"] == pointer, first
    assert fragment in first["message"], first
    assert f"line {line}" in error["message"]
    assert TrainingFile.objects.count() == 0


def test_untrainable_conversation_is_stored_with_its_problem(engineer):
    ends_on_user = {
        "id": "bad-end",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Are you there?"},
        ],
    }
    response = upload(engineer, jsonl(conversation(1), ends_on_user))
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "problems"
    assert body["validation_errors"] == [
        {
            "line": 2,
            "conversation_id": "bad-end",
            "message": "the conversation does not end with an assistant turn",
        }
    ]


def test_viewers_list_but_cannot_upload(api_as, engineer):
    upload(engineer, jsonl(conversation(1)))
    viewer = api_as(Role.VIEWER)
    assert_envelope(upload(viewer, jsonl(conversation(2))), 403)
    listed = viewer.get("training-files").json()
    assert listed["count"] == 1
    detail = viewer.get(f"training-files/{listed['items'][0]['id']}")
    assert detail.status_code == 200 and detail.json()["uploaded_by"] == engineer.user.username
    assert_envelope(viewer.get("training-files/00000000-0000-0000-0000-000000000000"), 404)
