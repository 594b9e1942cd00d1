"""Redis stopped while the API is in use (production mode: the cache, django-ratelimit's counter,
the gateway's exact cache, breaker state and shared rate limits all in Redis; the broker too).

A throwaway redis-server on a free loopback port is started by the test, the settings point the
cache, REDIS_URL and the Celery broker at it, then it is stopped and restarted on the same port:
/v1/chat answers 200 uncached (never 500), an /api/v1 route answers, /readyz is 503 naming the
cache and the broker, and after the restart cache hits resume and /readyz is 200 again.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from config.roles import Role
from tests.conftest import assert_envelope
from tests.jobs.test_public_api import chat, fake_model  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is not installed (CI installs it): the Redis outage cannot be staged",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def redis_server():
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_mode(redis_server, settings, monkeypatch):
    """The production wiring pointed at the throwaway Redis."""
    from config.celery import app

    settings.REDIS_URL = redis_server.url
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": redis_server.url,
            "KEY_PREFIX": "outage-test",
            "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
        }
    }
    monkeypatch.setattr(app.conf, "broker_url", redis_server.url)
    return redis_server


def _readyz(client, api_as):
    token = api_as(Role.ADMIN).token
    return client.get("/readyz", headers={"Authorization": f"Token {token.key}"})


@pytest.mark.django_db
def test_chat_survives_redis_outage_and_recovers(
    redis_mode,
    api_as,
    client,
    fake_model,  # noqa: F811
    caplog,
    monkeypatch,
):
    import logging

    from config import errors

    monkeypatch.setattr(errors, "_last_warned", {})
    caplog.set_level(logging.WARNING)
    engineer = api_as(Role.ENGINEER)

    # Redis up: the second identical question is a cache hit.
    first = chat(engineer, prompt="What is a budget?")
    assert first.status_code == 200, first.content
    assert first.json()["cache_hit"] is False
    assert chat(engineer, prompt="What is a budget?").json()["cache_hit"] is True
    assert len(fake_model.calls) == 1
    assert _readyz(client, api_as).status_code == 200

    redis_mode.stop()

    # Redis down: answers continue uncached, never a 500.
    for _ in range(3):
        response = chat(engineer, prompt="What is a budget?")
        assert response.status_code == 200, response.content
        assert response.json()["cache_hit"] is False
    assert len(fake_model.calls) == 4
    other = chat(engineer, prompt="Another question")
    assert other.status_code == 200, other.content
    # an /api/v1 route (token auth, the per-token rate limit) answers too
    listed = engineer.get("/api/v1/gateway/models")
    assert listed.status_code == 200, listed.content
    # one warning per part per interval, not one per request
    warnings = [
        r.getMessage() for r in caplog.records if "unavailable, degrading" in r.getMessage()
    ]
    assert sum("gateway response cache" in w for w in warnings) == 1
    assert any("API rate-limit counter" in w for w in warnings)
    # readiness degrades and names the cache and the broker
    ready = _readyz(client, api_as)
    assert ready.status_code == 503
    body = ready.json()
    assert {"cache", "broker"} <= set(body["degraded"])
    assert body["checks"]["cache"]["status"] == "down"

    redis_mode.start()  # same port, empty

    again = chat(engineer, prompt="What is a budget?")
    assert again.status_code == 200 and again.json()["cache_hit"] is False
    hit = chat(engineer, prompt="What is a budget?")
    assert hit.status_code == 200 and hit.json()["cache_hit"] is True
    assert _readyz(client, api_as).status_code == 200


@pytest.mark.django_db
def test_redis_error_on_an_api_route_is_a_503_envelope_not_a_500(redis_mode, api_as, monkeypatch):
    """A Redis error on a path with no degraded mode of its own: the shared API error mechanism
    answers 503 ``dependency_unavailable`` with Retry-After (config/api.py)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from jobs.models import RegisteredModel

    def unreachable(*args, **kwargs):
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1. Connection refused.")

    monkeypatch.setattr(RegisteredModel.objects, "select_related", unreachable)
    response = api_as(Role.ENGINEER).get("/api/v1/gateway/models")
    error = assert_envelope(response, 503, "dependency_unavailable")
    assert "Redis" in error["message"] and "127.0.0.1" not in error["message"]
    assert int(response["Retry-After"]) >= 1
    assert error["details"]["dependency"] == "redis"


@pytest.mark.django_db
def test_breaker_fails_open_but_counts_locally_while_redis_is_down(redis_mode, monkeypatch):
    from jobs.gateway import breaker as breaker_module
    from jobs.gateway.breaker import Breaker, breaker_state

    monkeypatch.setattr(breaker_module, "_local", {})
    redis_mode.stop()
    first = Breaker("outage-provider", threshold=2, reset_s=30)
    assert first.before_call() is None  # state unreadable: treated as closed
    assert first.failure() is False
    second = Breaker("outage-provider", threshold=2, reset_s=30)
    assert second.before_call() is None
    assert second.failure() is True  # two consecutive failures in this process: open locally
    wait = Breaker("outage-provider", threshold=2, reset_s=30).before_call()
    assert wait is not None and 25 < wait <= 30
    state = breaker_state("outage-provider")
    assert state["state"] == "open" and "unreachable" in state["detail"]

    redis_mode.start()  # the shared state (closed, empty Redis) takes over again
    assert Breaker("outage-provider", threshold=2, reset_s=30).before_call() is None
    assert breaker_state("outage-provider")["state"] == "closed"


@pytest.mark.django_db
def test_gateway_rate_limits_fall_back_to_a_per_process_limiter(redis_mode, monkeypatch):
    from jobs.gateway import ratelimit

    monkeypatch.setattr(ratelimit, "_fallback", None)
    monkeypatch.setattr(ratelimit, "_limiter", None)
    limits = [ratelimit.Limit("p:outage", "requests", 2, 60)]
    assert ratelimit.try_acquire(limits, tokens=10) is None  # shared counter (Redis up)
    redis_mode.stop()
    # the per-process limiter enforces the same limit from zero
    assert ratelimit.try_acquire(limits, tokens=10) is None
    assert ratelimit.try_acquire(limits, tokens=10) is None
    wait = ratelimit.try_acquire(limits, tokens=10)
    assert wait is not None and 0 < wait <= 62  # the window and its margin (held_s)
    redis_mode.start()  # shared counters again (an empty Redis: room for two)
    assert ratelimit.try_acquire(limits, tokens=10) is None
    assert ratelimit.limiter().storage.check()
