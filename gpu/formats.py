"""Training-file formats -> one internal conversation shape, for the platform and the worker.

A training file is JSONL, one conversation a line, in one of four formats (detected per
file from its first record, and every later record must be in the same one):

``crucible``
    Crucible's own (``schemas/training_file/v1.json``): ``id`` plus ``messages`` or
    ``system_prompt`` + ``training_pairs``. Validated by that JSON Schema on the platform
    and by ``gpu.data.parse_conversation`` in the worker, unchanged.
``openai_chat``
    OpenAI's chat fine-tuning JSONL (also TRL's conversational format): ``{"messages":
    [{"role", "content"}, ...]}``, with optional per-message ``weight`` (0 or 1: a weight-0
    assistant message is context, not a training target), ``name``, assistant
    ``tool_calls`` and ``tool`` messages, and a top-level ``tools`` list.
``sharegpt``
    ShareGPT as Axolotl and LLaMA-Factory read it: ``{"conversations": [{"from", "value"},
    ...]}`` with ``human``/``gpt``/``system``/``function_call``/``observation``/``tool``
    turns, optional ``system`` and ``tools`` (a list, or a JSON string of one).
``alpaca``
    ``{"instruction", "input", "output"}`` with optional ``system`` and ``history`` (a list
    of ``[instruction, response]`` pairs before this one, as LLaMA-Factory writes it).

Every format becomes a :class:`Chat`: an id (the record's own, or one derived from the line
number and a content hash, so the same file always gets the same ids), the messages as
``{"role", "content"}`` dicts (roles system/user/assistant/tool; an assistant message may
also carry ``tool_calls``), the indexes of assistant messages that are context only
(weight 0), the tool definitions and the metadata.

Tools: the worker passes ``tools`` to the chat template when the template uses them
(``gpu.data.ChatRenderer``); otherwise the tool definitions are kept with the file and
shown to no model. Tool calls are rendered natively when the template knows
``tool_calls``, else written into the assistant's text as ``<tool_call>{json}</tool_call>``
(:func:`flat_content`), which is what the model then learns.

Checks are written out here rather than as JSON Schemas: the worker has no jsonschema
dependency, the checks also normalise, and platform and worker must word an error the same.
Each error is a :class:`RecordError` with a JSON pointer into the record as written.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

CRUCIBLE = "crucible"
OPENAI_CHAT = "openai_chat"
SHAREGPT = "sharegpt"
ALPACA = "alpaca"

FORMATS: dict[str, str] = {
    CRUCIBLE: "Crucible",
    OPENAI_CHAT: "OpenAI chat",
    SHAREGPT: "ShareGPT",
    ALPACA: "Alpaca",
}
SHAPES: dict[str, str] = {
    CRUCIBLE: 'a Crucible record ("id" with "messages" or "training_pairs")',
    OPENAI_CHAT: 'an OpenAI chat record ({"messages": [...]}, no "id" needed)',
    SHAREGPT: 'a ShareGPT record ({"conversations": [{"from", "value"}, ...]})',
    ALPACA: 'an Alpaca record ({"instruction", "input", "output"})',
}
OPENAI_TOP_KEYS = frozenset({"tools", "parallel_tool_calls", "functions"})
OPENAI_MESSAGE_ONLY = frozenset({"weight", "name", "tool_calls", "tool_call_id", "refusal"})
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")
OPENAI_MESSAGE_KEYS = frozenset(
    {"role", "content", "weight", "name", "tool_calls", "tool_call_id", "refusal"}
)
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
MAX_ID_LENGTH = 200

__all__ = [
    "FORMATS",
    "Chat",
    "FormatTracker",
    "RecordError",
    "derive_id",
    "detect_format",
    "flat_content",
    "normalize",
    "to_messages",
]


class RecordError(ValueError):
    """A record that its format does not allow: where (JSON pointer) and why."""

    def __init__(self, pointer: str, message: str):
        super().__init__(message)
        self.pointer = pointer
        self.message = message


@dataclass
class Chat:
    """One conversation in the internal shape every format becomes."""

    id: str
    messages: list[dict[str, Any]]
    format: str
    id_derived: bool = False
    context_only: frozenset[int] = frozenset()  # assistant messages with weight 0
    tools: list | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def trained_turns(self) -> int:
        return sum(
            1
            for i, m in enumerate(self.messages)
            if m["role"] == "assistant" and i not in self.context_only
        )

    def flat_messages(self) -> list[dict[str, str]]:
        """``{"role", "content"}`` only, tool calls written into the text."""
        return [{"role": m["role"], "content": flat_content(m)} for m in self.messages]

    def openai_record(self) -> dict:
        """This conversation as an OpenAI chat fine-tuning record (``messages``, ``tools``)."""
        messages = []
        for i, message in enumerate(self.messages):
            out: dict[str, Any] = {"role": message["role"], "content": message["content"]}
            if message.get("tool_calls"):
                out["tool_calls"] = message["tool_calls"]
                out["content"] = message["content"] or None
            for key in ("name", "tool_call_id"):
                if message.get(key):
                    out[key] = message[key]
            if message["role"] == "assistant" and i in self.context_only:
                out["weight"] = 0
            messages.append(out)
        record: dict[str, Any] = {"messages": messages}
        if self.tools:
            record["tools"] = self.tools
        return record


# ------------------------------------------------------------------ detection


def detect_format(record: Any) -> str | None:
    """The format a record is written in, or None when it looks like none of them."""
    if not isinstance(record, dict):
        return None
    if "training_pairs" in record:
        return CRUCIBLE
    if "conversations" in record:
        return SHAREGPT
    if "instruction" in record or ("output" in record and "messages" not in record):
        return ALPACA
    if "messages" in record:
        if "id" in record and not _openai_only(record):
            return CRUCIBLE  # Crucible's "messages" shape, checked (and worded) as it always was
        if isinstance(record["messages"], list) and record["messages"]:
            return OPENAI_CHAT
        return CRUCIBLE  # nothing OpenAI-like to go on: Crucible's checks say what is missing
    if "id" in record:
        return CRUCIBLE
    return None


def _openai_only(record: dict) -> bool:
    """Whether a record uses what only OpenAI chat has (tools, weights, tool messages)."""
    if any(key in record for key in OPENAI_TOP_KEYS):
        return True
    messages = record.get("messages")
    if not isinstance(messages, list):
        return False
    return any(
        isinstance(m, dict)
        and (m.get("role") in ("tool", "developer") or any(k in m for k in OPENAI_MESSAGE_ONLY))
        for m in messages
    )


def unknown_format_message(record: Any) -> str:
    if not isinstance(record, dict):
        return "each line must be a JSON object (one conversation)"
    keys = ", ".join(repr(k) for k in list(record)[:8]) or "no keys"
    return f"not a known training-file format (the record has {keys}); expected " + "; or ".join(
        SHAPES[f] for f in (OPENAI_CHAT, SHAREGPT, ALPACA, CRUCIBLE)
    )


class FormatTracker:
    """The format of a file: set by its first record, and every later record must match."""

    def __init__(self) -> None:
        self.format: str | None = None
        self.line: int | None = None

    def check(self, record: Any, line: int) -> str:
        """The record's format, or RecordError when unknown or not the file's format."""
        found = detect_format(record)
        if found is None:
            raise RecordError("", unknown_format_message(record))
        if self.format is None:
            self.format, self.line = found, line
        elif (
            self.format == OPENAI_CHAT
            and found == CRUCIBLE
            and "messages" in record
            and "training_pairs" not in record
        ):
            return OPENAI_CHAT  # an OpenAI chat record that also carries an id
        elif found != self.format:
            raise RecordError(
                "",
                f"mixed formats: this line looks like {SHAPES[found]}, but the file is "
                f"{FORMATS[self.format]} (detected from line {self.line}); expected "
                f"{SHAPES[self.format]} on every line",
            )
        return found


# ------------------------------------------------------------------ ids and helpers


def derive_id(record: Any, line: int) -> str:
    """A stable id from the line number and a hash of the record's content."""
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return f"line-{line}-{hashlib.sha256(canonical.encode('utf-8')).hexdigest()[:12]}"


def _own_id(record: dict, line: int) -> tuple[str, bool]:
    value = record.get("id")
    if value is None or value == "":
        return derive_id(record, line), True
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RecordError("/id", "must be a string or an integer")
    value = str(value)
    if len(value) > MAX_ID_LENGTH:
        raise RecordError("/id", f"is longer than {MAX_ID_LENGTH} characters")
    return value, False


def _text(value: Any, pointer: str, what: str = "content", allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RecordError(pointer, f"{what} must be a string")
    if not allow_empty and not value.strip():
        raise RecordError(pointer, f"{what} is empty")
    return value


def _openai_content(value: Any, pointer: str, allow_empty: bool) -> str:
    """A string, or a list of text parts (joined); images and audio are refused."""
    if value is None and allow_empty:
        return ""
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            where = f"{pointer}/{i}"
            if not isinstance(part, dict):
                raise RecordError(where, "a content part must be an object")
            if part.get("type") != "text":
                raise RecordError(
                    f"{where}/type",
                    f"content parts of type {part.get('type')!r} are not supported (text only)",
                )
            texts.append(_text(part.get("text"), f"{where}/text", "text", allow_empty=True))
        value = "".join(texts)
    return _text(value, pointer, allow_empty=allow_empty)


def _tools(value: Any, pointer: str) -> list | None:
    if value is None:
        return None
    if isinstance(value, str):  # LLaMA-Factory stores tools as a JSON string
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RecordError(pointer, f"tools is a string but not JSON ({exc.msg})") from exc
    if not isinstance(value, list):
        raise RecordError(pointer, "tools must be a list of tool definitions")
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise RecordError(f"{pointer}/{i}", "a tool definition must be an object")
    return value or None


def _tool_calls(value: Any, pointer: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RecordError(pointer, "tool_calls must be a non-empty list")
    calls = []
    for i, call in enumerate(value):
        where = f"{pointer}/{i}"
        if not isinstance(call, dict):
            raise RecordError(where, "a tool call must be an object")
        function = call.get("function")
        if not isinstance(function, dict):
            raise RecordError(f"{where}/function", "must be an object with name and arguments")
        name = _text(function.get("name"), f"{where}/function/name", "name")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        out = {"type": call.get("type", "function"), "function": {"name": name}}
        out["function"]["arguments"] = arguments
        if call.get("id"):
            out["id"] = str(call["id"])
        calls.append(out)
    return calls


def _weight(message: dict, pointer: str, role: str) -> int:
    weight = message.get("weight", 1)
    if isinstance(weight, bool) or weight not in (0, 1):
        raise RecordError(f"{pointer}/weight", "weight must be 0 or 1")
    if weight == 0 and role != "assistant":
        raise RecordError(f"{pointer}/weight", "weight applies to assistant messages only")
    return weight


def flat_content(message: dict) -> str:
    """The message's text, with its tool calls (if any) written as ``<tool_call>`` blocks."""
    content = message.get("content") or ""
    calls = message.get("tool_calls") or ()
    blocks = []
    for call in calls:
        function = call["function"]
        try:
            arguments = json.loads(function["arguments"])
        except (json.JSONDecodeError, TypeError):
            arguments = function["arguments"]
        payload = json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False)
        blocks.append(f"<tool_call>\n{payload}\n</tool_call>")
    return "\n".join(([content] if content else []) + blocks)


# ------------------------------------------------------------------ the formats


def _crucible(record: dict, line: int) -> Chat:
    """A Crucible record that its schema (platform) or parser (worker) has already checked."""
    messages: list[dict[str, Any]] = []
    if "messages" in record:
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    else:
        if record.get("system_prompt"):
            messages.append({"role": "system", "content": record["system_prompt"]})
        for pair in record["training_pairs"]:
            messages.append({"role": "user", "content": pair["user_input"]})
            messages.append({"role": "assistant", "content": pair["target_response"]})
    return Chat(
        id=str(record["id"]),
        messages=messages,
        format=CRUCIBLE,
        metadata=record.get("metadata") or {},
    )


def _openai(record: dict, line: int) -> Chat:
    for key in record:
        if key not in ("messages", "tools", "parallel_tool_calls", "functions", "id", "metadata"):
            raise RecordError(
                f"/{key}",
                f"unexpected field {key!r}; an OpenAI chat record has messages, and optionally "
                "tools, parallel_tool_calls, metadata and id",
            )
    raw = record["messages"]
    if not isinstance(raw, list) or len(raw) < 2:
        raise RecordError("/messages", "messages must be a list of at least two messages")
    messages, context = [], set()
    for i, message in enumerate(raw):
        where = f"/messages/{i}"
        if not isinstance(message, dict):
            raise RecordError(where, "a message must be an object with role and content")
        extra = sorted(set(message) - OPENAI_MESSAGE_KEYS)
        if extra:
            raise RecordError(
                f"{where}/{extra[0]}",
                f"unexpected field {extra[0]!r} in a message; allowed: "
                + ", ".join(sorted(OPENAI_MESSAGE_KEYS)),
            )
        role = message.get("role")
        if role not in OPENAI_ROLES:
            raise RecordError(
                f"{where}/role",
                f"role must be one of {', '.join(OPENAI_ROLES)} (got {role!r})",
            )
        role = "system" if role == "developer" else role
        out: dict[str, Any] = {"role": role}
        calls = None
        if "tool_calls" in message and message["tool_calls"] is not None:
            if role != "assistant":
                raise RecordError(f"{where}/tool_calls", "only assistant messages make tool calls")
            calls = _tool_calls(message["tool_calls"], f"{where}/tool_calls")
        out["content"] = _openai_content(
            message.get("content"), f"{where}/content", allow_empty=calls is not None
        )
        if calls:
            out["tool_calls"] = calls
        for key in ("name", "tool_call_id"):
            if message.get(key) is not None:
                out[key] = _text(message[key], f"{where}/{key}", key)
        if _weight(message, where, role) == 0:
            context.add(i)
        messages.append(out)
    cid, derived = _own_id(record, line)
    metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    return Chat(
        id=cid,
        messages=messages,
        format=OPENAI_CHAT,
        id_derived=derived,
        context_only=frozenset(context),
        tools=_tools(record.get("tools") or record.get("functions"), "/tools"),
        metadata=metadata,
    )


def _sharegpt_call(value: str, pointer: str) -> list[dict]:
    """A ShareGPT ``function_call`` turn: a JSON object (or list) of name + arguments."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise RecordError(
            pointer, f"a function_call turn must hold JSON with name and arguments ({exc.msg})"
        ) from exc
    calls = parsed if isinstance(parsed, list) else [parsed]
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise RecordError(pointer, "a function_call turn must name the function (name)")
        out.append({"type": "function", "function": call})
    return _tool_calls(out, pointer)


def _sharegpt(record: dict, line: int) -> Chat:
    raw = record["conversations"]
    if not isinstance(raw, list) or not raw:
        raise RecordError("/conversations", "conversations must be a non-empty list of turns")
    messages: list[dict[str, Any]] = []
    context = set()
    if record.get("system") is not None:
        messages.append({"role": "system", "content": _text(record["system"], "/system")})
    for i, turn in enumerate(raw):
        where = f"/conversations/{i}"
        if not isinstance(turn, dict):
            raise RecordError(where, "a turn must be an object with from and value")
        source = turn.get("from")
        if source not in SHAREGPT_ROLES:
            raise RecordError(
                f"{where}/from",
                f"from must be one of {', '.join(SHAREGPT_ROLES)} (got {source!r})",
            )
        role = SHAREGPT_ROLES[source]
        value = _text(turn.get("value"), f"{where}/value", "value")
        if role == "system" and messages:
            raise RecordError(f"{where}/from", "a system turn may only come first")
        if source == "function_call":
            message = {"role": "assistant", "content": "", "tool_calls": []}
            message["tool_calls"] = _sharegpt_call(value, f"{where}/value")
        else:
            message = {"role": role, "content": value}
        if _weight(turn, where, role) == 0:
            context.add(len(messages))
        messages.append(message)
    cid, derived = _own_id(record, line)
    metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    return Chat(
        id=cid,
        messages=messages,
        format=SHAREGPT,
        id_derived=derived,
        context_only=frozenset(context),
        tools=_tools(record.get("tools"), "/tools"),
        metadata=metadata,
    )


def _alpaca(record: dict, line: int) -> Chat:
    instruction = _text(record.get("instruction"), "/instruction", "instruction")
    extra = record.get("input")
    if extra is not None:
        extra = _text(extra, "/input", "input", allow_empty=True)
    output = _text(record.get("output"), "/output", "output")
    messages: list[dict[str, Any]] = []
    if record.get("system") is not None:
        messages.append({"role": "system", "content": _text(record["system"], "/system")})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise RecordError("/history", "history must be a list of [instruction, response] pairs")
    for i, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            raise RecordError(f"/history/{i}", "each history entry is [instruction, response]")
        messages.append({"role": "user", "content": _text(pair[0], f"/history/{i}/0")})
        messages.append({"role": "assistant", "content": _text(pair[1], f"/history/{i}/1")})
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": output})
    cid, derived = _own_id(record, line)
    metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    return Chat(id=cid, messages=messages, format=ALPACA, id_derived=derived, metadata=metadata)


_NORMALISERS = {CRUCIBLE: _crucible, OPENAI_CHAT: _openai, SHAREGPT: _sharegpt, ALPACA: _alpaca}


def normalize(record: dict, fmt: str, line: int) -> Chat:
    """The record as a :class:`Chat`, or RecordError (pointer, message).

    A Crucible record must already have passed its own checks (the JSON Schema on the
    platform, ``gpu.data.parse_conversation`` in the worker); the other formats are checked
    here.
    """
    return _NORMALISERS[fmt](record, line)


def to_messages(record: dict, line: int = 0) -> list[dict[str, str]]:
    """The chat transcript (role + text) of a valid record in any format."""
    fmt = detect_format(record) or CRUCIBLE
    return normalize(record, fmt, line).flat_messages()


def problem(chat: Chat) -> str | None:
    """Why a well-formed conversation cannot be trained on as it is, or None."""
    roles = [m["role"] for m in chat.messages]
    if not roles or roles[-1] != "assistant":
        return "the conversation does not end with an assistant turn"
    body = [r for r in roles if r != "system"]
    if "system" in roles[1:]:
        return "a system message may only come first"
    if body and body[0] != "user":
        return "the conversation must start with a user turn (after an optional system prompt)"
    for a, b in itertools.pairwise(body):
        if a == b and a != "tool":
            return f"two {a} turns in a row"
        if b == "tool" and a not in ("assistant", "tool"):
            return "a tool result must follow an assistant turn"
    if chat.trained_turns == 0:
        return "no assistant turn to learn: every assistant message has weight 0"
    return None
