"""Training file -> checked conversations -> token ids with assistant-only labels -> packed rows.

The training file holds one conversation a line, in one of the formats of ``gpu.formats``
(detected from the first record; a file must not mix them): Crucible's own
(schemas/training_file/v1.json: ``messages`` [{role, content}] or ``system_prompt`` +
``training_pairs`` [{user_input, target_response}]), OpenAI chat JSONL, ShareGPT or Alpaca.
``gpu.formats`` turns each into the same chat transcript; the platform's validator uses the
same module, so what was accepted on upload trains the same way here.

Labels: each conversation is rendered once with the base model's chat template and tokenized
once (fast tokenizer, character offsets). The characters of each assistant turn -- its content
and the end-of-turn token that closes it -- are found by rendering the prefixes of the
conversation (``messages[:i]`` with the generation prompt, and ``messages[:i+1]``); tokens that
start inside those spans keep their id as label, every other token gets -100. So the model
learns the replies and to stop, never the prompts. An assistant message with weight 0 (OpenAI
chat, ShareGPT) is context: it is rendered but gets no labels.

Packing: examples are packed best-fit-decreasing into rows of at most max_seq_length tokens
(TRL's ``pack_dataset``); ``PackedCollator`` restarts ``position_ids`` at every conversation
and passes no attention mask, so transformers builds a block-diagonal causal mask: tokens
never attend across conversations, and no compute is spent on padding.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu import formats
from gpu.errors import DatasetFormatError, WorkerError

ROLES = ("system", "user", "assistant")
IGNORE = -100
REAL_TOKENS_KEY = "crucible_real_tokens"


@dataclass
class Conversation:
    row: int  # 1-based line number in the training file
    id: str
    messages: list[dict[str, Any]]
    # Indexes of assistant messages that are context only (weight 0): rendered, not learned.
    context_only: frozenset[int] = frozenset()
    # Tool definitions (OpenAI chat / ShareGPT): given to the chat template when it uses them.
    tools: list | None = None

    def trained(self, index: int) -> bool:
        return self.messages[index]["role"] == "assistant" and index not in self.context_only


# ------------------------------------------------------------------ reading and checks


def _fail(row: int, cid: str | None, field_name: str | None, problem: str) -> DatasetFormatError:
    where = f"Row {row}" + (f" (conversation {cid})" if cid else "")
    text = f"{where}: {field_name} {problem}" if field_name else f"{where}: {problem}"
    return DatasetFormatError(text, row=row, conversation_id=cid, field=field_name)


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _field(pointer: str) -> str | None:
    """``/messages/1/role`` -> ``messages[1].role`` (the worker's way of naming a field)."""
    out = ""
    for part in pointer.split("/")[1:]:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out or None


def _other_format(record: dict, row: int, fmt: str) -> Conversation:
    """A record in OpenAI chat, ShareGPT or Alpaca format, through ``gpu.formats``."""
    cid = record.get("id") if isinstance(record.get("id"), str | int) else None
    try:
        chat = formats.normalize(record, fmt, row)
    except formats.RecordError as exc:
        raise _fail(row, cid and str(cid), _field(exc.pointer), exc.message) from exc
    messages = chat.messages
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise _fail(
            row,
            chat.id,
            None,
            f"the last message is {messages[last]['role']!r}: a conversation must end with an "
            "assistant turn",
        )
    if not any(m["role"] == "user" for m in messages):
        raise _fail(row, chat.id, None, "the conversation has no user turn")
    if chat.trained_turns == 0:
        raise _fail(row, chat.id, None, "every assistant message has weight 0: nothing to learn")
    return Conversation(
        row=row, id=chat.id, messages=messages, context_only=chat.context_only, tools=chat.tools
    )


def parse_conversation(
    line: str, row: int, tracker: formats.FormatTracker | None = None
) -> Conversation:
    """One JSONL line -> Conversation, or a row-level DatasetFormatError.

    ``tracker`` holds the file's format (from its first record): a record in another
    format is refused. Crucible records are checked here, as they always were; the other
    formats by ``gpu.formats``.
    """
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _fail(row, None, None, f"invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(record, dict):
        raise _fail(row, None, None, "a line must be a JSON object (one conversation)")
    detected = formats.detect_format(record)
    fmt = detected or formats.CRUCIBLE  # unrecognisable: Crucible's checks say what is missing
    if tracker is not None and detected is not None:
        try:
            tracker.check(record, row)
        except formats.RecordError as exc:
            raise _fail(row, None, None, exc.message) from exc
    if fmt != formats.CRUCIBLE:
        return _other_format(record, row, fmt)
    cid = record.get("id")
    if not _nonempty_str(cid):
        raise _fail(row, None, "id", "is missing or empty")
    cid = str(cid)

    has_messages, has_pairs = "messages" in record, "training_pairs" in record
    if has_messages and has_pairs:
        raise _fail(row, cid, "messages", "and training_pairs are both present; use one of them")
    if not has_messages and not has_pairs:
        raise _fail(
            row, cid, "messages", "is missing (a conversation needs messages or training_pairs)"
        )

    messages: list[dict[str, str]] = []
    if has_messages:
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise _fail(row, cid, "messages", "must be a non-empty list")
        for i, message in enumerate(raw):
            if not isinstance(message, dict):
                raise _fail(row, cid, f"messages[{i}]", "must be an object with role and content")
            role = message.get("role")
            if role is None or role == "":
                raise _fail(row, cid, f"messages[{i}].role", "is missing or empty")
            if role not in ROLES:
                raise _fail(
                    row,
                    cid,
                    f"messages[{i}].role",
                    f"is unknown: {role!r} (expected system, user or assistant)",
                )
            if not _nonempty_str(message.get("content")):
                raise _fail(row, cid, f"messages[{i}].content", "is missing or empty")
            messages.append({"role": role, "content": message["content"]})
        if len(messages) < 2:
            raise _fail(row, cid, "messages", "needs at least two messages")
    else:
        if "system_prompt" in record and not _nonempty_str(record["system_prompt"]):
            raise _fail(row, cid, "system_prompt", "is empty")
        pairs = record["training_pairs"]
        if not isinstance(pairs, list) or not pairs:
            raise _fail(row, cid, "training_pairs", "must be a non-empty list")
        if _nonempty_str(record.get("system_prompt")):
            messages.append({"role": "system", "content": record["system_prompt"]})
        for i, pair in enumerate(pairs):
            if not isinstance(pair, dict):
                raise _fail(row, cid, f"training_pairs[{i}]", "must be an object")
            for key in ("user_input", "target_response"):
                if not _nonempty_str(pair.get(key)):
                    raise _fail(row, cid, f"training_pairs[{i}].{key}", "is missing or empty")
            messages.append({"role": "user", "content": pair["user_input"]})
            messages.append({"role": "assistant", "content": pair["target_response"]})

    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        field_name = f"messages[{last}].role" if has_messages else "training_pairs"
        raise _fail(
            row,
            cid,
            field_name,
            f"is {messages[last]['role']!r}: a conversation must end with an assistant turn",
        )
    if not any(m["role"] == "user" for m in messages):
        raise _fail(row, cid, "messages", "has no user turn")
    return Conversation(row=row, id=cid, messages=messages)


def read_conversations(lines: Iterable[str]) -> list[Conversation]:
    conversations: list[Conversation] = []
    seen: dict[str, int] = {}
    tracker = formats.FormatTracker()
    for row, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        conversation = parse_conversation(line.removeprefix("\ufeff"), row, tracker)
        if conversation.id in seen:
            raise _fail(
                row, conversation.id, "id", f"duplicates the id of row {seen[conversation.id]}"
            )
        seen[conversation.id] = row
        conversations.append(conversation)
    if not conversations:
        raise DatasetFormatError("The training file holds no conversations")
    return conversations


def read_training_file(path: str | Path) -> list[Conversation]:
    # Lines end at b"\n" only, as the platform's validator counts them (text mode would also
    # split at a lone "\r"), so row numbers and the ids derived from them agree.
    try:
        with open(path, "rb") as handle:
            return read_conversations(raw.decode("utf-8") for raw in handle)
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"The training file is not UTF-8: {exc}") from exc


def split_conversations(
    conversations: list[Conversation], validation_split: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """Seeded split by conversation; at least one of each when there are two or more."""
    n = len(conversations)
    n_val = round(n * validation_split)
    n_val = min(max(n_val, 1), n - 1) if validation_split > 0 and n >= 2 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [c for i, c in enumerate(conversations) if i not in val_idx]
    val = [c for i, c in enumerate(conversations) if i in val_idx]
    return train, val


# ------------------------------------------------------------------ rendering and labels


@dataclass
class Encoded:
    conversation: Conversation
    input_ids: list[int]
    labels: list[int]
    # [first, last] token index of each assistant turn's labelled tokens (last = end-of-turn)
    turns: list[tuple[int, int]] = field(default_factory=list)
    truncated: bool = False


class ChatRenderer:
    """Renders conversations with the tokenizer's chat template and builds assistant-only labels."""

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "is_fast", False):
            raise WorkerError("A fast tokenizer (with character offsets) is required")
        if not getattr(tokenizer, "chat_template", None):
            raise WorkerError("The base model's tokenizer has no chat template")
        self.tokenizer = tokenizer
        source = str(tokenizer.chat_template)
        # What the template itself can show: tool definitions and native tool calls. Without
        # them, tools stay metadata of the file (not shown to the model) and tool calls are
        # written into the assistant's text (gpu.formats.flat_content).
        self.supports_tools = "tools" in source
        self.supports_tool_calls = "tool_calls" in source
        self.eot_id, self.eot_token = self._detect_end_of_turn()

    def render(
        self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None
    ) -> str:
        extra = {"tools": tools} if tools and self.supports_tools else {}
        return self.tokenizer.apply_chat_template(
            self.template_messages(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **extra,
        )

    def template_messages(self, messages: list[dict]) -> list[dict]:
        """The messages as this template takes them: tool calls native or as text.

        Idempotent, so ``render`` applies it to whatever it is given (evaluation prompts too).
        """
        if not any(m.get("tool_calls") for m in messages):
            return messages
        out = []
        for message in messages:
            if not message.get("tool_calls"):
                out.append(message)
            elif self.supports_tool_calls:
                calls = []
                for call in message["tool_calls"]:
                    function = dict(call["function"])
                    # Chat templates expect the arguments as an object.
                    with contextlib.suppress(json.JSONDecodeError, TypeError):
                        function["arguments"] = json.loads(function["arguments"])
                    calls.append({**call, "function": function})
                out.append({**message, "tool_calls": calls})
            else:
                flat = {k: v for k, v in message.items() if k != "tool_calls"}
                out.append({**flat, "content": formats.flat_content(message)})
        return out

    def _detect_end_of_turn(self) -> tuple[int, str]:
        """The token the template puts right after an assistant reply (<|im_end|> for ChatML)."""
        marker = "Crucible probe reply"
        text = self.render(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}]
        )
        tail = text[text.rfind(marker) + len(marker) :]
        tail_ids = (
            self.tokenizer(tail, add_special_tokens=False)["input_ids"] if tail.strip() else []
        )
        special = set(self.tokenizer.all_special_ids) | set(
            getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        )
        if tail_ids and tail_ids[0] in special:
            token_id = tail_ids[0]
        elif self.tokenizer.eos_token_id is not None:
            token_id = self.tokenizer.eos_token_id
        else:
            raise WorkerError("Cannot tell the end-of-turn token of this chat template")
        return token_id, self.tokenizer.convert_ids_to_tokens(token_id)

    def _assistant_spans(
        self, messages: list[dict], text: str, tools: list | None = None
    ) -> list[tuple[int, int, int]]:
        """(message index, first char, end char) of each assistant turn in ``text``."""
        spans, cursor = [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True, tools=tools) if i else ""
            through = self.render(messages[: i + 1], tools=tools)
            if (
                i
                and text.startswith(before)
                and text.startswith(through)
                and len(through) > len(before)
            ):
                start, end = len(before), len(through)
            else:  # templates that are not prefix-stable: find the reply after the last span
                start = text.find(message["content"], cursor)
                if start < 0:
                    raise WorkerError(
                        "The chat template does not reproduce an assistant reply verbatim"
                    )
                end = start + len(message["content"])
                end += len(text[end:]) - len(text[end:].lstrip(" "))
                if text.startswith(self.eot_token, end):
                    end += len(self.eot_token)
            segment = text[start:end]
            cut = segment.rfind(self.eot_token)
            end = start + (cut + len(self.eot_token) if cut >= 0 else len(segment.rstrip()))
            spans.append((i, start, end))
            cursor = end
        return spans

    def encode(self, conversation: Conversation) -> Encoded:
        try:
            messages = self.template_messages(conversation.messages)
            text = self.render(messages, tools=conversation.tools)
            spans = self._assistant_spans(messages, text, conversation.tools)
        except WorkerError as exc:
            raise _fail(conversation.row, conversation.id, "messages", str(exc)) from exc
        except Exception as exc:  # jinja errors: roles must alternate, ...
            raise _fail(
                conversation.row,
                conversation.id,
                "messages",
                f"cannot be rendered by the chat template: {exc}",
            ) from exc
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoding["input_ids"])
        labels = [IGNORE] * len(ids)
        turns = []
        for index, start, end in spans:
            if not conversation.trained(index):
                continue  # weight 0: context, not a training target
            inside = [
                j
                for j, (a, b) in enumerate(encoding["offset_mapping"])
                if start <= a < end and b > a
            ]
            for j in inside:
                labels[j] = ids[j]
            if inside:
                turns.append((inside[0], inside[-1]))
        return Encoded(conversation, ids, labels, turns)


# ------------------------------------------------------------------ examples


@dataclass
class DatasetStats:
    conversations: int = 0
    train_conversations: int = 0
    val_conversations: int = 0
    train_examples: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    truncated_examples: int = 0
    dropped_examples: int = 0
    truncated_ids: list[str] = field(default_factory=list)
    max_seq_length: int = 0
    eot_token: str = ""
    label_tokens: int = 0


def check_end_of_turn(encoded: Encoded, eot_id: int, eot_token: str) -> None:
    """Every assistant turn of an untruncated example must end in a labelled end-of-turn token."""
    if encoded.truncated:
        return
    conversation = encoded.conversation
    n_assistant = sum(1 for i in range(len(conversation.messages)) if conversation.trained(i))
    ok = len(encoded.turns) == n_assistant and all(
        encoded.input_ids[last] == eot_id and encoded.labels[last] == eot_id
        for _, last in encoded.turns
    )
    if not ok:
        conv = encoded.conversation
        raise WorkerError(
            f"Row {conv.row} (conversation {conv.id}): the end-of-turn token {eot_token} is not "
            "in the labels of every assistant turn, so the model would not learn to stop; the "
            "chat template and the label mask disagree",
            {"row": conv.row, "conversation_id": conv.id, "eot_token": eot_token},
        )


def build_examples(
    conversations: list[Conversation], renderer: ChatRenderer, max_seq_length: int
) -> tuple[list[Encoded], DatasetStats]:
    """Encode, check and truncate (keep the start) the training conversations."""
    stats = DatasetStats(max_seq_length=max_seq_length, eot_token=renderer.eot_token)
    examples = []
    for conversation in conversations:
        encoded = renderer.encode(conversation)
        check_end_of_turn(encoded, renderer.eot_id, renderer.eot_token)
        if len(encoded.input_ids) > max_seq_length:
            encoded.truncated = True
            encoded.input_ids = encoded.input_ids[:max_seq_length]
            encoded.labels = encoded.labels[:max_seq_length]
            stats.truncated_examples += 1
            stats.truncated_ids.append(conversation.id)
        if all(label == IGNORE for label in encoded.labels[1:]):
            stats.dropped_examples += 1  # nothing left to learn after truncation
            continue
        examples.append(encoded)
        stats.train_tokens += len(encoded.input_ids)
        stats.label_tokens += sum(1 for label in encoded.labels[1:] if label != IGNORE)
    stats.train_examples = len(examples)
    if not examples:
        raise DatasetFormatError(
            f"No training example keeps an assistant token within max_seq_length={max_seq_length}"
        )
    if not any(renderer.eot_id in e.labels[1:] for e in examples):
        raise DatasetFormatError(
            f"No training example keeps its end-of-turn token {renderer.eot_token} within "
            f"max_seq_length={max_seq_length}: the model would never learn to stop; raise "
            "max_seq_length.",
            field="hyperparameters.max_seq_length",
        )
    return examples, stats


def encode_all(conversations: list[Conversation], renderer: ChatRenderer) -> list[Encoded]:
    return [renderer.encode(c) for c in conversations]


def truncate(encoded: Iterable[Encoded], max_seq_length: int) -> list[Encoded]:
    out = []
    for e in encoded:
        ids, labels = e.input_ids[:max_seq_length], e.labels[:max_seq_length]
        if any(label != IGNORE for label in labels[1:]):
            out.append(
                Encoded(e.conversation, ids, labels, e.turns, len(e.input_ids) > max_seq_length)
            )
    return out


# ------------------------------------------------------------------ packing


def pack(examples: list[Encoded], max_seq_length: int):
    """Best-fit-decreasing packing into rows of <= max_seq_length tokens (columns input_ids,
    labels, seq_lengths). Deterministic for a given input order."""
    from datasets import Dataset
    from trl import pack_dataset

    dataset = Dataset.from_dict(
        {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
    )
    return pack_dataset(dataset, max_seq_length, strategy="bfd")


def steps_per_epoch(num_rows: int, micro_batch_size: int, gradient_accumulation_steps: int) -> int:
    batches = math.ceil(num_rows / micro_batch_size)
    return max(math.ceil(batches / gradient_accumulation_steps), 1)


class PackedCollator:
    """Rows of packed conversations -> input_ids, labels, position_ids (no attention mask).

    ``position_ids`` restart at 0 at each conversation, which transformers turns into a
    block-diagonal causal mask (SDPA/eager); the first label of each conversation is -100 so no
    token is predicted across a boundary. Rows shorter than the longest in the batch get a pad
    tail that is its own segment and carries no labels.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_ids, batch_labels, batch_pos = [], [], []
        real = 0
        for feature in features:
            ids = list(feature["input_ids"])
            labels = list(feature["labels"])
            lengths = list(feature.get("seq_lengths") or [len(ids)])
            if sum(lengths) != len(ids):
                raise WorkerError("packed row: seq_lengths do not add up to the row length")
            positions, offset = [], 0
            for length in lengths:
                positions.extend(range(length))
                labels[offset] = IGNORE
                offset += length
            pad = width - len(ids)
            real += len(ids)
            batch_ids.append(ids + [self.pad_token_id] * pad)
            batch_labels.append(labels + [IGNORE] * pad)
            batch_pos.append(positions + list(range(pad)))
        return {
            "input_ids": torch.tensor(batch_ids, dtype=torch.long),
            "labels": torch.tensor(batch_labels, dtype=torch.long),
            "position_ids": torch.tensor(batch_pos, dtype=torch.long),
            # Not a model input: the trainer pops it to count real (non-pad) tokens.
            REAL_TOKENS_KEY: torch.tensor(real, dtype=torch.long),
        }
