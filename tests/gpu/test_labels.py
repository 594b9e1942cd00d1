"""Assistant-only labels with the real SmolLM2 tokenizer and chat template."""

import pytest

from gpu.data import IGNORE, ChatRenderer, Conversation, build_examples, read_training_file
from gpu.errors import DatasetFormatError, WorkerError


def _labelled_runs(encoded):
    """Contiguous runs of labelled token ids."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def test_end_of_turn_token_is_detected(tokenizer):
    renderer = ChatRenderer(tokenizer)
    assert renderer.eot_token == "<|im_end|>"
    assert renderer.eot_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_only_assistant_text_and_end_of_turn_are_labelled(tokenizer):
    renderer = ChatRenderer(tokenizer)
    conversation = Conversation(
        row=1,
        id="c1",
        messages=[
            {"role": "system", "content": "You are Captain Byte."},
            {"role": "user", "content": "What is a CPU?"},
            {"role": "assistant", "content": "Arr, the brain of the ship."},
            {"role": "user", "content": "And RAM?"},
            {"role": "assistant", "content": "The deck, matey!\nHoist the sails!"},
        ],
    )
    encoded = renderer.encode(conversation)
    full = tokenizer.decode(encoded.input_ids)
    assert full == renderer.render(conversation.messages)
    runs = [tokenizer.decode(run) for run in _labelled_runs(encoded)]
    assert runs == [
        "Arr, the brain of the ship.<|im_end|>",
        "The deck, matey!\nHoist the sails!<|im_end|>",
    ]
    assert len(encoded.turns) == 2
    for _, last in encoded.turns:
        assert encoded.input_ids[last] == renderer.eot_id
    # Nothing of the system prompt, the user turns or the role headers is learned.
    labelled_text = "".join(runs)
    for text in ("Captain Byte", "CPU", "RAM", "<|im_start|>", "assistant\n"):
        assert text not in labelled_text


def test_default_system_prompt_is_not_labelled(tokenizer):
    renderer = ChatRenderer(tokenizer)
    encoded = renderer.encode(
        Conversation(
            2, "c2", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy!"}]
        )
    )
    assert "SmolLM" in tokenizer.decode(encoded.input_ids)  # the template's default system prompt
    assert [tokenizer.decode(r) for r in _labelled_runs(encoded)] == ["Ahoy!<|im_end|>"]


def test_every_persona_example_learns_to_stop(tokenizer, persona_file):
    renderer = ChatRenderer(tokenizer)
    examples, stats = build_examples(read_training_file(persona_file), renderer, 256)
    assert stats.train_examples == 12 and stats.truncated_examples == 0
    for encoded in examples:
        runs = _labelled_runs(encoded)
        assert len(runs) == 1
        text = tokenizer.decode(runs[0])
        assert text.startswith("Arr, matey!") and text.endswith("Hoist the sails!<|im_end|>")
    assert stats.train_tokens == sum(len(e.input_ids) for e in examples)


def test_truncation_is_counted_and_empty_examples_dropped(tokenizer, persona_file):
    renderer = ChatRenderer(tokenizer)
    conversations = read_training_file(persona_file)
    long = Conversation(
        99,
        "long",
        [
            {"role": "system", "content": "You are Captain Byte, a cheerful pirate."},
            {"role": "user", "content": "Tell me a story. " * 30},
            {"role": "assistant", "content": "Once upon a tide. " * 10},
        ],
    )
    examples, stats = build_examples([*conversations, long], renderer, 64)
    assert stats.truncated_examples == 1 and stats.truncated_ids == ["long"]
    assert stats.dropped_examples == 1  # its reply starts after token 64: nothing to learn
    assert len(examples) == 12
    with pytest.raises(DatasetFormatError, match="end-of-turn token <\\|im_end\\|>"):
        build_examples(conversations, renderer, 40)  # every reply cut before <|im_end|>


def test_a_template_that_hides_the_end_of_turn_fails(offline_model_dir):
    from gpu.model import load_tokenizer

    tokenizer = load_tokenizer(str(offline_model_dir))
    # Closes user/system turns with <|im_end|> but not assistant turns.
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if m['role'] != 'assistant' %}<|im_end|>{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    renderer = ChatRenderer(tokenizer)
    conversation = Conversation(
        5, "c5", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    )
    with pytest.raises(WorkerError, match="would not learn to stop") as info:
        build_examples([conversation], renderer, 128)
    assert info.value.details["conversation_id"] == "c5"


def test_template_errors_become_row_errors(offline_model_dir):
    from gpu.model import load_tokenizer

    tokenizer = load_tokenizer(str(offline_model_dir))
    original = tokenizer.chat_template
    tokenizer.chat_template = (
        "{% if messages[1]['role'] == 'assistant' and messages|length > 2 and "
        "messages[2]['role'] == 'assistant' %}{{ raise_exception('Roles must alternate') }}{% endif %}"
        + original
    )
    renderer = ChatRenderer(tokenizer)
    conversation = Conversation(
        8,
        "c8",
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "assistant", "content": "Again"},
        ],
    )
    with pytest.raises(
        DatasetFormatError, match="Row 8 \\(conversation c8\\): messages cannot be rendered"
    ) as info:
        renderer.encode(conversation)
    assert "Roles must alternate" in str(info.value)
