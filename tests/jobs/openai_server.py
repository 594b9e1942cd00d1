"""A loopback OpenAI-compatible server for the tests and benches (stdlib http.server in a
thread): ``/v1/chat/completions``, ``/v1/embeddings`` and ``/v1/models``, with scripted faults
and a log of every request (path, body, headers, arrival time).

    server = OpenAIServer()            # or the ``openai_server`` fixture
    server.fail(429, headers={"Retry-After": "2"})   # the next request gets a 429
    server.fail(500); server.fail("timeout", delay=3); server.fail("reset")
    server.fail("malformed")           # 200 with a body that is not JSON
    server.models = [{"id": "m1", "object": "model", "owned_by": "x", "context_length": 8192}]
    ...  base_url = server.url         # "http://127.0.0.1:<port>/v1"
    server.close()

``"stream": true`` answers as SSE chunks (``server.stream_delay`` seconds apart; a usage
chunk when ``stream_options.include_usage``; ``server.stream_break_after`` drops the
connection mid-stream).

Faults are consumed in order, one per request (any path unless ``path`` is given); with none
left the server answers normally. Chat answers echo the last user message ("echo: ..."),
deterministically, with usage counted as whitespace-separated words (+1 per message).
``api_key``: when set, requests without ``Authorization: Bearer <api_key>`` get a 401.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Fault:
    kind: int | str  # an HTTP status, "timeout", "reset" or "malformed"
    headers: dict = field(default_factory=dict)
    body: dict | str | None = None
    delay: float = 0.0
    path: str | None = None


@dataclass
class Logged:
    path: str
    method: str
    body: dict
    headers: dict
    at: float  # time.time() at arrival
    answered: str = ""  # "ok", a status, "timeout", "reset", "malformed"


def _words(text: str) -> int:
    return len(text.split())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class OpenAIServer:
    def __init__(self, *, api_key: str | None = None, latency: float = 0.0):
        self.api_key = api_key
        self.latency = latency
        self.faults: list[Fault] = []
        self.requests: list[Logged] = []
        self.models: list[dict] = [
            {"id": "test-chat", "object": "model", "owned_by": "loopback", "created": 1},
            {"id": "test-embed", "object": "model", "owned_by": "loopback", "created": 1},
        ]
        self.lock = threading.Lock()
        # Streaming (``"stream": true``): seconds between chunks; drop the connection after
        # this many words (None: never); streams whose client went away before the end.
        self.stream_delay = 0.0
        self.stream_break_after: int | None = None
        self.stream_aborted = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                # Headers and body go out in two writes: without NODELAY, Nagle and the
                # client's delayed ACK add ~40 ms to every answer.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args):
                pass

            def _reply(self, status: int, payload, headers: dict | None = None):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, str(value))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else {}
                except json.JSONDecodeError:
                    body = {"_raw": raw.decode(errors="replace")}
                path = self.path.split("?")[0]
                entry = Logged(
                    path, method, body, {k.lower(): v for k, v in self.headers.items()}, time.time()
                )
                with server.lock:
                    server.requests.append(entry)
                    fault = server._next_fault(path)
                if server.latency:
                    time.sleep(server.latency)
                if fault is not None:
                    entry.answered = str(fault.kind)
                    return self._fault(fault)
                if server.api_key and self.headers.get("Authorization") != (
                    f"Bearer {server.api_key}"
                ):
                    entry.answered = "401"
                    return self._reply(
                        401,
                        {"error": {"message": "Invalid API key", "type": "invalid_request_error"}},
                    )
                entry.answered = "ok"
                if method == "GET" and path.endswith("/models"):
                    return self._reply(200, {"object": "list", "data": server.models})
                if method == "POST" and path.endswith("/chat/completions"):
                    if body.get("stream"):
                        return self._stream(body)
                    return self._reply(200, server.completion(body))
                if method == "POST" and path.endswith("/embeddings"):
                    return self._reply(200, server.embeddings(body))
                entry.answered = "404"
                return self._reply(404, {"error": {"message": f"No route {path}"}})

            def _stream(self, body: dict):
                """SSE: the answer word by word (``stream_delay`` apart), the finish reason,
                a usage chunk when ``stream_options.include_usage``, then ``[DONE]``; the body
                ends when the connection closes. ``stream_break_after``: drop the connection
                after that many words."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                whole = server.completion(body)
                base = {
                    "id": whole["id"],
                    "object": "chat.completion.chunk",
                    "created": whole["created"],
                    "model": whole["model"],
                }
                text = whole["choices"][0]["message"]["content"]
                words = text.split(" ")
                events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
                events += [
                    {
                        **base,
                        "choices": [{"index": 0, "delta": {"content": w if i == 0 else " " + w}}],
                    }
                    for i, w in enumerate(words)
                ]
                events.append(
                    {
                        **base,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {},
                                "finish_reason": whole["choices"][0]["finish_reason"],
                            }
                        ],
                    }
                )
                if (body.get("stream_options") or {}).get("include_usage"):
                    events.append({**base, "choices": [], "usage": whole["usage"]})
                try:
                    for i, event in enumerate(events):
                        if i and server.stream_delay:
                            time.sleep(server.stream_delay)
                        if server.stream_break_after is not None and i > server.stream_break_after:
                            self.connection.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                            )
                            self.connection.close()
                            return None
                        self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                        self.wfile.flush()
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except OSError:  # the client went away mid-stream
                    with server.lock:
                        server.stream_aborted += 1
                return None

            def _fault(self, fault: Fault):
                if fault.kind == "timeout":
                    time.sleep(fault.delay or 5.0)
                    with contextlib.suppress(OSError):  # the client gave up meanwhile
                        self._reply(200, server.completion({}))
                    return None
                if fault.kind == "reset":
                    # RST instead of FIN: SO_LINGER with a zero timeout, then close.
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()
                    self.close_connection = True
                    return None
                if fault.delay:
                    time.sleep(fault.delay)
                if fault.kind == "malformed":
                    payload = fault.body if fault.body is not None else '{"choices": [ oops'
                    return self._reply(
                        200,
                        payload.encode() if isinstance(payload, str) else payload,
                        fault.headers,
                    )
                status = int(fault.kind)
                payload = fault.body or {
                    "error": {"message": f"scripted {status}", "type": "server_error"}
                }
                return self._reply(status, payload, fault.headers)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"

    # --- Scripting -------------------------------------------------------------------------

    def fail(
        self,
        kind: int | str,
        *,
        headers: dict | None = None,
        body: dict | str | None = None,
        delay: float = 0.0,
        times: int = 1,
        path: str | None = None,
    ) -> OpenAIServer:
        with self.lock:
            for _ in range(times):
                self.faults.append(Fault(kind, dict(headers or {}), body, delay, path))
        return self

    def _next_fault(self, path: str) -> Fault | None:
        for i, fault in enumerate(self.faults):
            if fault.path is None or path.endswith(fault.path):
                return self.faults.pop(i)
        return None

    def calls(self, path: str = "/chat/completions") -> list[Logged]:
        with self.lock:
            return [r for r in self.requests if r.path.endswith(path)]

    def reset(self) -> None:
        with self.lock:
            self.faults.clear()
            self.requests.clear()

    # --- Answers ---------------------------------------------------------------------------

    @staticmethod
    def completion(body: dict) -> dict:
        messages = body.get("messages") or [{"role": "user", "content": ""}]
        last = next((m for m in reversed(messages) if m.get("role") == "user"), messages[-1]).get(
            "content"
        )
        text = f"echo: {last}" if isinstance(last, str) else "echo"
        if body.get("seed") is not None:
            text += f" (seed {body['seed']})"
        max_tokens = body.get("max_tokens")
        words = text.split()
        finish = "stop"
        if isinstance(max_tokens, int) and len(words) > max_tokens:
            words, finish = words[:max_tokens], "length"
            text = " ".join(words)
        prompt = sum(_words(str(m.get("content") or "")) + 1 for m in messages)
        completion = len(words)
        return {
            "id": "chatcmpl-"
            + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12],
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": body.get("model", "test-chat"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }

    @staticmethod
    def embeddings(body: dict) -> dict:
        inputs = body.get("input") or []
        if isinstance(inputs, str):
            inputs = [inputs]
        data = []
        for i, text in enumerate(inputs):
            digest = hashlib.sha256(str(text).encode()).digest()
            vector = [(b - 127.5) / 127.5 for b in digest[:8]]
            data.append({"object": "embedding", "index": i, "embedding": vector})
        tokens = sum(_words(str(t)) for t in inputs)
        return {
            "object": "list",
            "data": data,
            "model": body.get("model", "test-embed"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> None:  # pragma: no cover - a manual tool: python -m tests.jobs.openai_server
    server = OpenAIServer()
    print(server.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":  # pragma: no cover
    main()


# --- pytest fixtures (import them into a test module: they are not in a conftest so that
# --- every app's tests can use the server without sharing a conftest) --------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - the bench imports this module without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture
    def openai_server():
        server = OpenAIServer()
        yield server
        server.close()

    @pytest.fixture
    def loopback_model(openai_server, db):
        """A provider on the loopback server (a unique slug: breaker, cache and rate-limit
        state in a shared Redis never leaks between tests) and its priced chat model."""
        import uuid

        from jobs.models import Provider, RegisteredModel

        slug = f"loop-{uuid.uuid4().hex[:8]}"
        provider = Provider.objects.create(
            slug=slug, name="Loopback", kind="openai", base_url=openai_server.url, timeout_s=2.0
        )
        return RegisteredModel.objects.create(
            provider=provider,
            remote_id="test-chat",
            key=f"{slug}/test-chat",
            display_name="Loopback chat",
            price_input_per_m=1,
            price_output_per_m=2,
            price_source="admin",
            capabilities=["chat"],
        )

    @pytest.fixture
    def fast_gateway(db, monkeypatch):
        """Gateway settings for tests: 4 attempts, tiny backoff, and the waits recorded
        (``waits``) instead of slept."""
        from jobs.gateway import client
        from jobs.models import GatewaySettings

        conf = GatewaySettings.load()
        conf.retry_attempts = 4
        conf.backoff_base_s = 0.01
        conf.backoff_cap_s = 0.05
        conf.timeout_s = 2.0
        conf.deadline_s = 60.0
        conf.breaker_failure_threshold = 50
        conf.breaker_reset_s = 30.0
        conf.save()
        waits: list[float] = []
        monkeypatch.setattr(client, "sleep", waits.append)
        yield waits
        # Rolled-back rows fire no signals: drop the process's cached settings and models.
        client._settings_cache = None
        client._model_cache.clear()
