"""jobs/model_client.py against a loopback OpenAI-compatible server (the real InferenceClient)."""

import json
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from billing.models import LedgerEntry
from config.errors import ExternalServiceError
from jobs.model_client import ModelClient, judge_with_endpoint, model_client, parse_scores


class FakeEndpoint:
    """/v1/chat/completions that answers from a script of (status, body, headers)."""

    def __init__(self):
        self.script: list[tuple[int, dict | str, dict]] = []
        self.requests: list[dict] = []
        self.default_text = "Hello from the endpoint."
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                endpoint.requests.append(
                    {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
                )
                if endpoint.script:
                    status, payload, headers = endpoint.script.pop(0)
                else:
                    status, payload, headers = 200, endpoint.completion(endpoint.default_text), {}
                data = (
                    payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                )
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def completion(text: str, prompt_tokens: int = 20, completion_tokens: int = 7) -> dict:
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "test-judge",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    server = FakeEndpoint()
    yield server
    server.close()


@pytest.fixture
def sleeps():
    return []


@pytest.fixture
def client(endpoint, sleeps, db):
    return ModelClient(
        base_url=endpoint.url,
        api_key="secret-key",
        model="test-judge",
        timeout=5,
        attempts=4,
        price_per_1k_tokens=0.5,
        sleep=sleeps.append,
    )


def test_chat_completion_goes_to_the_endpoint_and_counts_tokens(client, endpoint):
    result = client.chat([{"role": "user", "content": "Hi"}], max_tokens=16)
    assert result.text == "Hello from the endpoint."
    assert (result.prompt_tokens, result.completion_tokens, result.total_tokens) == (20, 7, 27)
    assert result.finish_reason == "stop"
    [request] = endpoint.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == "Bearer secret-key"
    assert request["body"]["model"] == "test-judge"
    assert request["body"]["max_tokens"] == 16
    assert request["body"]["messages"] == [{"role": "user", "content": "Hi"}]
    assert client.usage.calls == 1 and client.usage.total_tokens == 27
    entry = LedgerEntry.objects.get(kind=LedgerEntry.Kind.LLM_TOKENS)
    assert entry.quantity == 27
    assert entry.amount == Decimal("0.013500")  # 27 tokens at $0.50 / 1k


def test_429_is_retried_after_the_servers_retry_after(client, endpoint, sleeps):
    endpoint.script = [
        (429, {"error": "slow down"}, {"Retry-After": "7"}),
        (503, {"error": "overloaded"}, {}),
    ]
    result = client.chat([{"role": "user", "content": "Hi"}])
    assert result.text == "Hello from the endpoint."
    assert len(endpoint.requests) == 3
    assert len(sleeps) == 2
    assert sleeps[0] >= 7  # Retry-After honoured
    assert client.usage.calls == 1


def test_a_4xx_is_permanent_and_not_retried(client, endpoint, sleeps):
    endpoint.script = [(400, {"error": "bad model"}, {})]
    with pytest.raises(ExternalServiceError) as caught:
        client.chat([{"role": "user", "content": "Hi"}])
    assert caught.value.transient is False
    assert "400" in caught.value.message
    assert len(endpoint.requests) == 1 and sleeps == []
    assert not LedgerEntry.objects.exists()


def test_5xx_gives_up_after_the_attempts_as_transient(client, endpoint, sleeps):
    endpoint.script = [(502, {"error": "bad gateway"}, {})] * 4
    with pytest.raises(ExternalServiceError) as caught:
        client.chat([{"role": "user", "content": "Hi"}])
    assert caught.value.transient is True
    assert len(endpoint.requests) == 4 and len(sleeps) == 3


def test_an_unreachable_endpoint_is_transient(db, sleeps):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = ModelClient(
        base_url=f"http://127.0.0.1:{port}/v1", model="m", attempts=2, sleep=sleeps.append
    )
    with pytest.raises(ExternalServiceError) as caught:
        client.chat([{"role": "user", "content": "Hi"}])
    assert caught.value.transient is True
    assert len(sleeps) == 1


def test_judge_scores_come_back_as_integers(client, endpoint):
    endpoint.default_text = 'Scores: {"empathy": 4, "clarity": 5, "appropriateness": 3}'
    dims = [{"name": "empathy"}, {"name": "clarity"}, {"name": "appropriateness"}]
    scores, raw = judge_with_endpoint(
        client, dimensions=dims, prompt="I lost my job.", response="I'm sorry to hear that."
    )
    assert scores == {"empathy": 4, "clarity": 5, "appropriateness": 3}
    assert raw["tokens"] == 27
    sent = endpoint.requests[0]["body"]["messages"][-1]["content"]
    assert "I lost my job." in sent and "I'm sorry to hear that." in sent


@pytest.mark.parametrize(
    "text", ["no json here", '{"empathy": 4}', '{"empathy": 9, "clarity": 2}', '{"empathy": "x"}']
)
def test_judge_answers_that_are_not_scores_are_permanent_errors(text):
    with pytest.raises(ExternalServiceError) as caught:
        parse_scores(text, ["empathy", "clarity"])
    assert caught.value.transient is False


def test_without_an_endpoint_the_offline_model_answers(db, settings):
    settings.MODEL_GATEWAY_URL = ""
    settings.HF_TOKEN = ""
    client = model_client(offline_answer=lambda messages, max_tokens: f"offline:{max_tokens}")
    assert not client.configured and client.name == "offline"
    result = client.chat([{"role": "user", "content": "Hi"}], max_tokens=5)
    assert result.offline and result.text == "offline:5"
    assert not LedgerEntry.objects.exists()


def test_settings_choose_the_gateway_or_the_hf_router(settings):
    settings.MODEL_GATEWAY_URL = ""
    settings.HF_TOKEN = "hf_abc"
    assert model_client().base_url == "https://router.huggingface.co/v1"
    assert model_client().api_key == "hf_abc"
    settings.MODEL_GATEWAY_URL = "http://gateway.internal/v1/"
    settings.MODEL_GATEWAY_API_KEY = "gw"
    assert model_client().base_url == "http://gateway.internal/v1"
    assert model_client().api_key == "gw"
