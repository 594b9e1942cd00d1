"""The worker reads OpenAI chat, ShareGPT and Alpaca files through gpu.formats, the module the
platform validates with: same conversations, same ids, weight-0 turns unlabelled, tools
rendered only where the chat template knows them."""

import json
import uuid
from pathlib import Path

import pytest

from gpu import formats
from gpu.data import IGNORE, ChatRenderer, build_examples, read_conversations, read_training_file
from gpu.errors import DatasetFormatError
from tests.gpu.conftest import make_spec, start_worker, worker_log

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples" / "training" / "formats"

OPENAI_WEIGHTED = {
    "messages": [
        {"role": "system", "content": "You are Captain Byte."},
        {"role": "user", "content": "What is a CPU?"},
        {"role": "assistant", "content": "A toaster, probably.", "weight": 0},
        {"role": "user", "content": "Try again."},
        {"role": "assistant", "content": "Arr, the brain of the ship."},
    ]
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "monthly_payment",
            "description": "Monthly payment of a fixed-rate loan.",
            "parameters": {"type": "object", "properties": {"principal": {"type": "number"}}},
        },
    }
]
OPENAI_TOOLS = {
    "messages": [
        {"role": "user", "content": "Payment on $1,000?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "monthly_payment", "arguments": '{"principal": 1000}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"monthly_payment": 87.5}'},
        {"role": "assistant", "content": "About $87.50 a month."},
    ],
    "tools": TOOLS,
}


def _labelled_text(tokenizer, encoded) -> list[str]:
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_a_weight_0_assistant_turn_gets_no_labels(tokenizer):
    renderer = ChatRenderer(tokenizer)
    (conversation,) = read_conversations([json.dumps(OPENAI_WEIGHTED)])
    assert conversation.context_only == frozenset({2})
    encoded = renderer.encode(conversation)
    text = tokenizer.decode(encoded.input_ids)
    assert "A toaster, probably." in text  # the context turn is in the input...
    runs = _labelled_text(tokenizer, encoded)
    assert runs == ["Arr, the brain of the ship.<|im_end|>"]  # ...but only the last is learned
    assert len(encoded.turns) == 1
    examples, stats = build_examples([conversation], renderer, 512)
    assert stats.train_examples == 1
    assert stats.label_tokens == sum(1 for label in examples[0].labels[1:] if label != IGNORE)

    unweighted = json.loads(json.dumps(OPENAI_WEIGHTED))
    del unweighted["messages"][2]["weight"]
    both = renderer.encode(read_conversations([json.dumps(unweighted)])[0])
    assert _labelled_text(tokenizer, both) == [
        "A toaster, probably.<|im_end|>",
        "Arr, the brain of the ship.<|im_end|>",
    ]


def test_a_file_where_every_reply_has_weight_0_is_refused_with_its_row():
    record = json.loads(json.dumps(OPENAI_WEIGHTED))
    record["messages"][4]["weight"] = 0
    with pytest.raises(DatasetFormatError) as info:
        read_conversations([json.dumps(OPENAI_WEIGHTED), json.dumps(record)])
    assert info.value.row == 2 and "weight 0" in str(info.value)


@pytest.mark.parametrize("name", ["openai_chat", "sharegpt", "alpaca"])
def test_the_worker_reads_each_sample_as_the_platform_does(name, tokenizer):
    path = SAMPLES / f"{name}.jsonl"
    conversations = read_training_file(path)
    again = read_training_file(path)
    expected = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        record = json.loads(line)
        assert formats.detect_format(record) == name
        expected.append(formats.normalize(record, name, number))
    assert [c.id for c in conversations] == [c.id for c in expected] == [c.id for c in again]
    assert [c.messages for c in conversations] == [c.messages for c in expected]
    assert [c.context_only for c in conversations] == [c.context_only for c in expected]
    # Every sample conversation trains: labelled tokens, each ending on the end-of-turn token.
    _examples, stats = build_examples(conversations, ChatRenderer(tokenizer), 2048)
    assert stats.train_examples == len(conversations) and stats.truncated_examples == 0
    assert stats.label_tokens > 0


def test_tool_calls_become_text_when_the_template_has_no_tools(tokenizer):
    renderer = ChatRenderer(tokenizer)
    assert not renderer.supports_tools and not renderer.supports_tool_calls  # SmolLM2's ChatML
    (conversation,) = read_conversations([json.dumps(OPENAI_TOOLS)])
    assert conversation.tools == TOOLS
    encoded = renderer.encode(conversation)
    text = tokenizer.decode(encoded.input_ids)
    assert "monthly_payment" in text and "Monthly payment of a fixed-rate loan" not in text
    runs = _labelled_text(tokenizer, encoded)
    assert runs == [
        '<tool_call>\n{"name": "monthly_payment", "arguments": {"principal": 1000}}\n'
        "</tool_call><|im_end|>",
        "About $87.50 a month.<|im_end|>",
    ]
    assert "87.5}" not in "".join(runs)  # the tool's result is input, not a target


NATIVE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}"
    "CALL {{ call.function.name }} {{ call.function.arguments | tojson }}"
    "{% endfor %}{% else %}{{ message['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_with_tools_gets_them_natively(tokenizer):
    original = tokenizer.chat_template
    tokenizer.chat_template = NATIVE_TEMPLATE
    try:
        renderer = ChatRenderer(tokenizer)
        assert renderer.supports_tools and renderer.supports_tool_calls
        (conversation,) = read_conversations([json.dumps(OPENAI_TOOLS)])
        encoded = renderer.encode(conversation)
    finally:
        tokenizer.chat_template = original
    text = tokenizer.decode(encoded.input_ids)
    assert text.startswith("<|im_start|>system\nTools: [")
    assert "Monthly payment of a fixed-rate loan" in text  # the definitions reach the model
    assert _labelled_text(tokenizer, encoded) == [
        'CALL monthly_payment {"principal": 1000}<|im_end|>',
        "About $87.50 a month.<|im_end|>",
    ]


def test_the_worker_refuses_a_mixed_file_and_bad_records_with_row_and_field():
    sharegpt = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    with pytest.raises(DatasetFormatError) as info:
        read_conversations(["", json.dumps(OPENAI_WEIGHTED), json.dumps(sharegpt)])
    assert info.value.row == 3
    assert "mixed formats" in str(info.value) and "detected from line 2" in str(info.value)

    bad = json.loads(json.dumps(sharegpt))
    bad["conversations"][1]["from"] = "bot"
    with pytest.raises(DatasetFormatError) as info:
        read_conversations([json.dumps(sharegpt), json.dumps(bad)])
    assert (info.value.row, info.value.field) == (2, "conversations[1].from")
    assert str(info.value).startswith("Row 2: conversations[1].from from must be one of")

    with pytest.raises(DatasetFormatError) as info:
        read_conversations([json.dumps({"instruction": "Say hi", "output": ""})])
    assert (info.value.row, info.value.field) == (1, "output")


@pytest.mark.slow
def test_worker_trains_on_the_openai_chat_sample(webhook_sink, tmp_path, offline_model_dir):
    """One short real run: the OpenAI sample (weight 0 and tools included) trains to the end."""
    job = f"openai-{uuid.uuid4().hex[:8]}"
    path = SAMPLES / "openai_chat.jsonl"
    spec = make_spec(
        job,
        path.as_uri(),
        (tmp_path / "out").as_uri(),
        webhook_sink.url,
        hyperparameters={"max_steps": 2, "max_seq_length": 384},
        checkpoint_every_steps=2,
    )
    proc = start_worker(spec, tmp_path)
    rc = proc.wait(timeout=600)
    assert rc == 0, worker_log(tmp_path, job)
    dataset = webhook_sink.of_type("dataset")[0]["data"]
    assert dataset["conversations"] == 5
    assert (dataset["train_conversations"], dataset["val_conversations"]) == (4, 1)
    assert [e["type"] for e in webhook_sink.events if e["type"] != "heartbeat"][-1] == "completed"


def test_the_worker_numbers_lines_as_the_platform_does(tmp_path):
    """BOM, CRLF line ends and a blank line: the same rows, so the same derived ids."""
    records = [OPENAI_WEIGHTED, OPENAI_TOOLS]
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps(records[0]).encode()
        + b"\r\n\r\n"
        + json.dumps(records[1]).encode()
        + b"\r\n"
    )
    conversations = read_training_file(path)
    assert [c.row for c in conversations] == [1, 3]
    assert [c.id for c in conversations] == [
        formats.derive_id(records[0], 1),
        formats.derive_id(records[1], 3),
    ]
