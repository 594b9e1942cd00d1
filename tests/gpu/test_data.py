"""Training file -> conversations: format conversion, row-level checks, the split."""

import json

import pytest

from gpu.data import read_conversations, read_training_file, split_conversations
from gpu.errors import DatasetFormatError


def _pairs(cid="conv-001", **extra):
    record = {
        "id": cid,
        "system_prompt": "Be kind.",
        "training_pairs": [
            {"user_input": "Hi", "target_response": "Hello!"},
            {"user_input": "Bye", "target_response": "Goodbye!", "quality_score": 4.5},
        ],
    }
    record.update(extra)
    return record


def _messages(cid="conv-002", messages=None):
    return {
        "id": cid,
        "messages": messages
        or [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ],
    }


def _lines(*records):
    return [r if isinstance(r, str) else json.dumps(r) for r in records]


def test_both_formats_become_chat_messages(persona_file):
    convs = read_conversations(_lines(_pairs(), _messages()))
    assert convs[0].row == 1 and convs[0].id == "conv-001"
    assert convs[0].messages == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye!"},
    ]
    assert convs[1].messages[-1] == {"role": "assistant", "content": "4"}
    no_system = read_conversations(
        _lines({"id": "x", "training_pairs": [{"user_input": "a", "target_response": "b"}]})
    )
    assert [m["role"] for m in no_system[0].messages] == ["user", "assistant"]
    assert len(read_training_file(persona_file)) == 12


def test_blank_lines_are_skipped_but_counted():
    convs = read_conversations(["", json.dumps(_pairs()), "   ", json.dumps(_messages())])
    assert [c.row for c in convs] == [2, 4]


def _error(lines) -> DatasetFormatError:
    with pytest.raises(DatasetFormatError) as info:
        read_conversations(lines)
    return info.value


CASES = [
    (
        _pairs(
            training_pairs=[
                {"user_input": "a", "target_response": "b"},
                {"user_input": "c", "target_response": "d"},
                {"user_input": "e"},
            ]
        ),
        "training_pairs[2].target_response",
        "Row 47 (conversation conv-001): training_pairs[2].target_response is missing or empty",
    ),
    (
        _pairs(training_pairs=[{"user_input": "   ", "target_response": "b"}]),
        "training_pairs[0].user_input",
        "Row 47 (conversation conv-001): training_pairs[0].user_input is missing or empty",
    ),
    (_pairs(training_pairs=[]), "training_pairs", "training_pairs must be a non-empty list"),
    (_pairs(system_prompt=""), "system_prompt", "system_prompt is empty"),
    (
        _messages(messages=[{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]),
        "messages[1].role",
        "Row 47 (conversation conv-002): messages[1].role is unknown: 'robot' (expected system, user or assistant)",
    ),
    (
        _messages(messages=[{"role": "user", "content": "a"}, {"content": "b"}]),
        "messages[1].role",
        "messages[1].role is missing or empty",
    ),
    (
        _messages(
            messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]
        ),
        "messages[1].content",
        "Row 47 (conversation conv-002): messages[1].content is missing or empty",
    ),
    (
        _messages(
            messages=[
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ]
        ),
        "messages[2].role",
        "Row 47 (conversation conv-002): messages[2].role is 'user': "
        "a conversation must end with an assistant turn",
    ),
    (_messages(messages=["hello", "there"]), "messages[0]", "messages[0] must be an object"),
    ({"id": "conv-9", "messages": [], "training_pairs": []}, "messages", "are both present"),
    ({"id": "conv-9"}, "messages", "messages is missing"),
    ({"messages": []}, "id", "Row 47: id is missing or empty"),
]


@pytest.mark.parametrize(("record", "field", "message"), CASES)
def test_row_level_errors_name_row_conversation_and_field(record, field, message):
    lines = [""] * 46 + [json.dumps(record)]  # the bad conversation is on line 47
    error = _error(lines)
    assert error.row == 47
    assert error.field == field
    assert message in str(error)
    assert error.details["row"] == 47 and error.details["field"] == field
    if "conversation" in message:
        assert error.conversation_id == record["id"]
    assert error.error_type == "DatasetFormatError" and error.exit_code == 2


def test_invalid_json_and_non_objects():
    error = _error(_lines(_pairs(), '{"id": "conv-2", "messages": [}'))
    assert error.row == 2 and error.conversation_id is None
    assert str(error).startswith("Row 2: invalid JSON")
    assert "Row 1: a line must be a JSON object" in str(_error(["[1, 2]"]))


def test_duplicate_ids():
    error = _error(_lines(_pairs("a"), _messages("b"), _pairs("a")))
    assert str(error) == "Row 3 (conversation a): id duplicates the id of row 1"
    assert (error.row, error.conversation_id, error.field) == (3, "a", "id")


def test_empty_file():
    assert "no conversations" in str(_error(["", "  "]))


def test_split_is_seeded_and_by_conversation():
    convs = read_conversations(_lines(*[_pairs(f"c{i}") for i in range(10)]))
    train, val = split_conversations(convs, 0.2, seed=7)
    _, again_val = split_conversations(convs, 0.2, seed=7)
    assert [c.id for c in val] == [c.id for c in again_val] and len(val) == 2
    assert {c.id for c in train} | {c.id for c in val} == {c.id for c in convs}
    assert not {c.id for c in train} & {c.id for c in val}
    assert split_conversations(convs[:1], 0.2, 1) == (convs[:1], [])
    assert len(split_conversations(convs[:3], 0.01, 1)[1]) == 1  # at least one held out
    assert split_conversations(convs, 0.0, 1)[1] == []
