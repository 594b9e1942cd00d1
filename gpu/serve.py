"""An OpenAI-compatible model server for one base model and its LoRA adapters (no Django).

    python -m gpu.serve --host 127.0.0.1 --port 8765 [--base SmolLM2-135M-Instruct | --base DIR]
                        [--adapter-root DIR] [--max-adapters 8] [--batch-window-ms 15]
                        [--max-batch 16] [--device auto]

Routes (the shapes vLLM's OpenAI server uses, so one gateway provider reaches either):

- ``POST /v1/chat/completions``: non-streaming, or SSE (``stream: true``) ending with
  ``data: [DONE]``; ``stream_options.include_usage`` adds one final chunk with ``usage`` and
  empty ``choices``. ``model`` is the base model's id or an adapter's name.
- ``POST /v1/embeddings``: all-MiniLM-L6-v2 (384 dimensions) from gpu/generate.py, offline.
- ``GET /v1/models``: the base model, the embedder and every known adapter (``parent`` = base,
  ``root`` = the adapter's folder), as vLLM lists LoRA modules.
- ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` and
  ``POST /v1/unload_lora_adapter`` ``{"lora_name"}`` (vLLM's bodies; plain-text success).
  With ``--adapter-root``, a model name that is a folder under it is loaded on first use.
- ``GET /health``: 200 once the base model is loaded.

The base model is loaded once. Adapters are peft adapters on it (``load_adapter`` /
``set_adapter``); at most K stay resident, least recently used unloaded first (their path is
remembered, so they come back on the next request). One generation thread owns the model:
requests with the same sampling settings that arrive within the batch window share one
left-padded ``generate`` call of at most B rows whatever their adapters (peft's mixed-adapter
batches: one adapter name per row; at most K adapters in a batch); token counts are exact (the
tokenizer's prompt tokens per row, generated tokens up to and including end-of-sequence).
Streaming is real: a streamer hands each step's tokens to every row's SSE stream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("crucible.serve")

DEFAULT_BASE = "SmolLM2-135M-Instruct"
EMBEDDING_ID = "all-minilm-l6-v2"


# --- Requests and their batching -----------------------------------------------------------------


@dataclass
class GenRequest:
    adapter: str | None  # None: the base model
    messages: list[dict]
    max_new_tokens: int
    temperature: float
    top_p: float
    repetition_penalty: float
    seed: int
    stop: tuple[str, ...]
    future: Future = field(default_factory=Future)
    on_text: Any = None  # callable(str) for streamed pieces, called from the generation thread
    enqueued: float = field(default_factory=time.perf_counter)

    def group(self) -> tuple:
        """Rows that may share one generate call: the same decoding (and, when sampling, the
        same seed, so a seeded request stays reproducible). Adapters may differ: peft runs a
        mixed batch with one adapter name per row."""
        sampling = self.temperature > 0
        return (
            sampling,
            self.temperature if sampling else 0.0,
            self.top_p if sampling else 1.0,
            self.repetition_penalty,
            self.seed if sampling else None,
        )


@dataclass
class GenResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    batch_size: int
    queue_ms: float
    adapter_load_ms: float


class ServeError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class Engine:
    """The base model, its resident adapters and the one generation thread."""

    def __init__(
        self,
        base_dir: str | Path,
        *,
        base_id: str,
        device: str = "auto",
        max_adapters: int = 8,
        batch_window_ms: float = 15.0,
        max_batch: int = 16,
        adapter_root: str | Path | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from gpu.generate import resolve_device

        self.base_id = base_id
        self.device = resolve_device(device)
        self.max_adapters = max(1, int(max_adapters))
        self.batch_window_s = max(0.0, batch_window_ms / 1000)
        self.max_batch = max(1, int(max_batch))
        self.adapter_root = Path(adapter_root) if adapter_root else None
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.float32 if self.device == "cpu" else torch.bfloat16
        self.model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype).to(
            self.device
        )
        self.model.eval()
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.known: dict[str, str] = {}  # adapter name -> folder
        self.resident: OrderedDict[str, float] = OrderedDict()  # name -> load seconds
        self.model_lock = threading.RLock()
        self.created = int(time.time())
        self.stats = {"batches": 0, "rows": 0, "adapter_loads": 0, "adapter_load_s": 0.0}
        self._pending: list[GenRequest] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="serve-generate", daemon=True)
        self._thread.start()

    # Adapters ---------------------------------------------------------------------------------

    def adapter_register(self, name: str, path: str) -> None:
        folder = Path(path)
        if not (folder / "adapter_config.json").is_file():
            raise ServeError(400, f"No adapter_config.json in {path}")
        if name == self.base_id or name == EMBEDDING_ID:
            raise ServeError(400, f"The adapter name {name!r} is taken by a base model")
        with self.model_lock:
            if name in self.known and self.known[name] != str(folder):
                self._evict(name)
            self.known[name] = str(folder)
            self._ensure_resident(name)

    def adapter_unregister(self, name: str) -> None:
        with self.model_lock:
            if name not in self.known:
                raise ServeError(404, f"The LoRA adapter {name!r} is not loaded", "not_found")
            self._evict(name)
            del self.known[name]

    def resolve(self, model: str) -> str | None:
        """The adapter name for ``model`` (None for the base); unknown models raise 404."""
        if model == self.base_id:
            return None
        if model in self.known:
            return model
        if self.adapter_root is not None and "/" not in model and not model.startswith("."):
            folder = self.adapter_root / model
            if (folder / "adapter_config.json").is_file():
                with self.model_lock:
                    self.known.setdefault(model, str(folder))
                return model
        raise ServeError(404, f"The model {model!r} does not exist", "model_not_found")

    def _ensure_resident(self, name: str) -> float:
        """Load ``name`` onto the base if it is not (unloading the least recently used beyond
        K); returns the seconds it took (0 when it was resident). Holds the model lock."""
        from peft import PeftModel

        with self.model_lock:
            if name in self.resident:
                self.resident.move_to_end(name)
                return 0.0
            started = time.perf_counter()
            while len(self.resident) >= self.max_adapters:
                self._evict(next(iter(self.resident)))
            path = self.known[name]
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            self.model.to(self.device)
            self.model.eval()
            seconds = time.perf_counter() - started
            self.resident[name] = seconds
            self.stats["adapter_loads"] += 1
            self.stats["adapter_load_s"] += seconds
            return seconds

    def _evict(self, name: str) -> None:
        if name not in self.resident:
            return
        if len(self.resident) == 1:
            # peft keeps at least one adapter: unwrap back to the plain base model instead.
            self.model = self.model.unload()
        else:
            self.model.delete_adapter(name)
        del self.resident[name]

    # Generation -------------------------------------------------------------------------------

    def submit(self, request: GenRequest) -> Future:
        with self._cond:
            self._pending.append(request)
            self._cond.notify()
        return request.future

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _take_batch(self) -> list[GenRequest] | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            # The window opens with the oldest request: later ones for its group may join.
            deadline = self._pending[0].enqueued + self.batch_window_s
            while not self._stopping:
                group = self._pending[0].group()
                same = sum(1 for r in self._pending if r.group() == group)
                left = deadline - time.perf_counter()
                if same >= self.max_batch or left <= 0:
                    break
                self._cond.wait(timeout=left)
            group = self._pending[0].group()
            batch, adapters = [], set()
            for r in self._pending:
                if r.group() != group or len(batch) >= self.max_batch:
                    continue
                # every adapter of a batch must be resident at once: at most K of them
                if r.adapter and r.adapter not in adapters:
                    if len(adapters) >= self.max_adapters:
                        continue
                    adapters.add(r.adapter)
                batch.append(r)
            taken = {id(r) for r in batch}
            self._pending = [r for r in self._pending if id(r) not in taken]
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                results = self._generate(batch)
            except Exception as exc:  # every waiting request hears of it
                log.exception("generation failed")
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            for request, result in zip(batch, results, strict=True):
                request.future.set_result(result)

    def _generate(self, batch: list[GenRequest]) -> list[GenResult]:
        import torch
        from transformers.generation.streamers import BaseStreamer

        first = batch[0]
        tokenizer = self.tokenizer
        started = time.perf_counter()
        texts = [
            tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False)
            for r in batch
        ]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        prompt_counts = [int(n) for n in inputs["attention_mask"].sum(dim=1)]
        width = int(inputs["input_ids"].shape[1])
        limit = max(r.max_new_tokens for r in batch)
        eos_ids = _eos_ids(self.model, tokenizer)
        streamers = [_RowStream(tokenizer, r, eos_ids) for r in batch]

        class Fanout(BaseStreamer):
            def __init__(self):
                self.prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # the first put is the prompt
                    self.prompt_seen = True
                    return
                tokens = value.reshape(len(batch), -1)[:, -1].tolist()
                for stream, token in zip(streamers, tokens, strict=True):
                    stream.push(int(token))

            def end(self):
                for stream in streamers:
                    stream.flush()

        with self.model_lock:
            wanted = list(dict.fromkeys(r.adapter for r in batch if r.adapter))
            load_s = sum(self._ensure_resident(name) for name in wanted)
            kwargs: dict[str, Any] = {
                "max_new_tokens": limit,
                "repetition_penalty": first.repetition_penalty,
                "do_sample": first.temperature > 0,
                "pad_token_id": tokenizer.pad_token_id,
                "use_cache": True,
            }
            if first.temperature > 0:
                kwargs |= {"temperature": first.temperature, "top_p": first.top_p}
            else:
                kwargs |= {"temperature": None, "top_p": None, "top_k": None}
            if any(r.on_text for r in batch):
                kwargs["streamer"] = Fanout()
            from peft import PeftModel

            context: Any = contextlib.nullcontext()
            names = {r.adapter for r in batch}
            if isinstance(self.model, PeftModel):
                if len(names) > 1:  # a mixed batch: each row names its adapter
                    kwargs["adapter_names"] = [r.adapter or "__base__" for r in batch]
                elif first.adapter:
                    self.model.set_adapter(first.adapter)
                else:
                    context = self.model.disable_adapter()
            with context, torch.inference_mode():
                torch.manual_seed(first.seed)
                output = self.model.generate(**inputs, **kwargs)
        self.stats["batches"] += 1
        self.stats["rows"] += len(batch)
        results = []
        for i, request in enumerate(batch):
            new = output[i, width:].tolist()
            count, finish = 0, "length"
            for token in new[: request.max_new_tokens]:
                count += 1
                if token in eos_ids:
                    finish = "stop"
                    break
            text = tokenizer.decode(new[:count], skip_special_tokens=True)
            for stop in request.stop:
                if stop and stop in text:
                    text, finish = text[: text.index(stop)], "stop"
            results.append(
                GenResult(
                    text=text.strip() if not request.on_text else text,
                    prompt_tokens=prompt_counts[i],
                    completion_tokens=count,
                    finish_reason=finish,
                    batch_size=len(batch),
                    queue_ms=(started - request.enqueued) * 1000,
                    adapter_load_ms=load_s * 1000,
                )
            )
        return results


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(configured)
    return ids


class _RowStream:
    """One row's streamed text: decodes its tokens so far and passes on the new part (held
    back while it ends in an incomplete UTF-8 character), stopping at end-of-sequence, its own
    token limit or a stop string."""

    def __init__(self, tokenizer, request: GenRequest, eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.request = request
        self.eos_ids = eos_ids
        self.tokens: list[int] = []
        self.sent = ""
        self.done = request.on_text is None

    def push(self, token: int) -> None:
        if self.done:
            return
        if token in self.eos_ids:
            self.done = True
            return
        self.tokens.append(token)
        if len(self.tokens) >= self.request.max_new_tokens:
            self.done = True
        self._emit(final=self.done)

    def flush(self) -> None:
        if self.request.on_text is not None:
            self._emit(final=True)
            self.done = True

    def _emit(self, *, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return
        for stop in self.request.stop:
            if stop and stop in text:
                text = text[: text.index(stop)]
                self.done = True
        if len(text) > len(self.sent):
            piece, self.sent = text[len(self.sent) :], text
            self.request.on_text(piece)


# --- HTTP ----------------------------------------------------------------------------------------


def _error(status: int, message: str, code: str = "invalid_request_error"):
    from starlette.responses import JSONResponse

    kind = "NotFoundError" if status == 404 else "BadRequestError"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": code}},
        status_code=status,
    )


def _gen_request(engine: Engine, body: dict) -> tuple[str, GenRequest]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ServeError(400, "'model' is required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ServeError(400, "'messages' must be a non-empty list")
    plain = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ServeError(400, "each message needs a 'role' and 'content'")
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        plain.append({"role": message["role"], "content": content or ""})
    if int(body.get("n") or 1) != 1:
        raise ServeError(400, "only n=1 is supported")
    adapter = engine.resolve(model)
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
    try:
        max_tokens = int(max_tokens)
        temperature = float(body.get("temperature") if body.get("temperature") is not None else 0)
        top_p = float(body.get("top_p") if body.get("top_p") is not None else 1)
        repetition = float(body.get("repetition_penalty") or 1.0)
        seed = int(body.get("seed") if body.get("seed") is not None else 0)
    except (TypeError, ValueError):
        raise ServeError(400, "max_tokens, temperature, top_p and seed must be numbers") from None
    if max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ServeError(400, "need max_tokens >= 1, temperature >= 0 and 0 < top_p <= 1")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(str(s) for s in stop)
    return model, GenRequest(
        adapter=adapter,
        messages=plain,
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        repetition_penalty=repetition,
        seed=seed,
        stop=stop,
    )


def create_app(engine: Engine, *, embeddings: bool = True):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    async def read_json(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ServeError(400, "The body is not JSON") from None
        if not isinstance(body, dict):
            raise ServeError(400, "The body must be a JSON object")
        return body

    def guarded(handler):
        async def wrapped(request: Request):
            try:
                return await handler(request)
            except ServeError as exc:
                return _error(exc.status, exc.message, exc.code)

        return wrapped

    async def health(request: Request):
        return JSONResponse(
            {
                "status": "ok",
                "base": engine.base_id,
                "device": engine.device,
                "adapters": {"known": len(engine.known), "resident": list(engine.resident)},
                "stats": engine.stats,
            }
        )

    async def models(request: Request):
        data = [
            {
                "id": engine.base_id,
                "object": "model",
                "created": engine.created,
                "owned_by": "crucible",
                "root": engine.base_id,
                "parent": None,
                "max_model_len": engine.context_length or None,
                "capabilities": ["chat"],
            }
        ]
        if embeddings:
            data.append(
                {
                    "id": EMBEDDING_ID,
                    "object": "model",
                    "created": engine.created,
                    "owned_by": "crucible",
                    "root": EMBEDDING_ID,
                    "parent": None,
                    "capabilities": ["embeddings"],
                }
            )
        for name, path in sorted(engine.known.items()):
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": engine.created,
                    "owned_by": "crucible",
                    "root": path,
                    "parent": engine.base_id,
                    "max_model_len": engine.context_length or None,
                    "capabilities": ["chat"],
                }
            )
        return JSONResponse({"object": "list", "data": data})

    async def load_adapter(request: Request):
        body = await read_json(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ServeError(400, "Both 'lora_name' and 'lora_path' must be provided.")
        await asyncio.to_thread(engine.adapter_register, name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_adapter(request: Request):
        body = await read_json(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise ServeError(400, "'lora_name' must be provided.")
        await asyncio.to_thread(engine.adapter_unregister, name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def embed(request: Request):
        from gpu import generate

        if not embeddings:
            raise ServeError(404, "This server has no embedding model", "model_not_found")
        body = await read_json(request)
        if body.get("model") not in (EMBEDDING_ID, None):
            raise ServeError(404, f"The model {body.get('model')!r} does not exist")
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not (isinstance(inputs, list) and inputs and all(isinstance(t, str) for t in inputs)):
            raise ServeError(400, "'input' must be a string or a non-empty list of strings")
        vectors, tokens = await asyncio.to_thread(generate.embed, inputs)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": v}
                    for i, v in enumerate(vectors)
                ],
                "model": EMBEDDING_ID,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def chat(request: Request):
        body = await read_json(request)
        model, gen = _gen_request(engine, body)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if not body.get("stream"):
            result: GenResult = await asyncio.wrap_future(engine.submit(gen))
            return JSONResponse(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": result.text},
                            "logprobs": None,
                            "finish_reason": result.finish_reason,
                        }
                    ],
                    "usage": _usage(result),
                    "crucible": {"batch_size": result.batch_size, "queue_ms": result.queue_ms},
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        gen.on_text = lambda piece: loop.call_soon_threadsafe(queue.put_nowait, piece)
        future = asyncio.wrap_future(engine.submit(gen))
        future.add_done_callback(lambda _f: queue.put_nowait(None))

        def chunk(delta: dict, finish: str | None, usage: dict | None = None) -> str:
            payload = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": []
                if usage is not None
                else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if usage is not None:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": ""}, None)
            while True:
                piece = await queue.get()
                if piece is None:
                    break
                yield chunk({"content": piece}, None)
            try:
                result = future.result()
            except Exception as exc:
                error = {"error": {"message": f"generation failed: {exc}", "code": "server_error"}}
                yield f"data: {json.dumps(error)}\n\n"
                yield "data: [DONE]\n\n"
                return
            yield chunk({}, result.finish_reason)
            if include_usage:
                yield chunk({}, None, usage=_usage(result))
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
            Route("/v1/embeddings", guarded(embed), methods=["POST"]),
            Route("/v1/load_lora_adapter", guarded(load_adapter), methods=["POST"]),
            Route("/v1/unload_lora_adapter", guarded(unload_adapter), methods=["POST"]),
        ],
        lifespan=lifespan,
    )


def _usage(result: GenResult) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def engine_from_args(args: argparse.Namespace) -> Engine:
    from gpu.model import OFFLINE_MODELS, ensure_offline_model

    base = args.base
    if base in OFFLINE_MODELS:
        base_dir = ensure_offline_model(base)
        base_id = args.served_name or base.lower()
    else:
        base_dir = Path(base)
        base_id = args.served_name or base_dir.name
    return Engine(
        base_dir,
        base_id=base_id,
        device=args.device,
        max_adapters=args.max_adapters,
        batch_window_ms=args.batch_window_ms,
        max_batch=args.max_batch,
        adapter_root=args.adapter_root,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=os.environ.get("MODEL_SERVER_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("MODEL_SERVER_PORT", 8765)))
    parser.add_argument("--base", default=DEFAULT_BASE, help="offline model name or a folder")
    parser.add_argument("--served-name", default="", help="the base model's id in /v1/models")
    parser.add_argument("--adapter-root", default=os.environ.get("MODEL_SERVER_ADAPTERS"))
    parser.add_argument("--max-adapters", type=int, default=8)
    parser.add_argument("--batch-window-ms", type=float, default=15.0)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    engine = engine_from_args(args)
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
