"""Shared rate limits: interactive callers get RateLimited with a retry-after, batch callers
wait; two processes hammering one limit never exceed it in any window (the database storage
embedded, Redis when REDIS_URL is set); the database storage itself."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.db import connection

from billing.models import LlmCall
from jobs import gateway
from jobs.gateway import client, ratelimit
from jobs.gateway.ratelimit import DatabaseStorage

pytest_plugins = ["tests.jobs.openai_server"]

REPO = Path(__file__).resolve().parents[2]
BODY = {"messages": [{"role": "user", "content": "limit me"}], "max_tokens": 4}


@pytest.mark.django_db
def test_interactive_caller_gets_rate_limited(
    loopback_model, openai_server, fast_gateway, settings
):
    settings.GATEWAY_RATE_WINDOW_S = 30
    provider = loopback_model.provider
    provider.requests_per_minute = 2
    provider.save()
    for _ in range(2):
        gateway.chat(model=loopback_model.key, request=BODY, cache="no-store")
    with pytest.raises(gateway.RateLimited) as caught:
        gateway.chat(model=loopback_model.key, request=BODY, cache="no-store")
    error = caught.value
    assert error.status_code == 429 and error.code == "rate_limited"
    assert 0 < error.retry_after <= 31  # the window and its margin (ratelimit.held_s)
    assert error.details["retry_after"] == math.ceil(error.retry_after)
    assert len(openai_server.calls()) == 2
    assert LlmCall.objects.filter(outcome="error:rate_limited").count() == 1


@pytest.mark.django_db
def test_model_token_limit(loopback_model, openai_server, fast_gateway, settings):
    settings.GATEWAY_RATE_WINDOW_S = 30
    # "limit me": 3 + 4 + ceil(8 / 3) = 10 prompt tokens estimated, + max_tokens 4 = 14 a call.
    loopback_model.tokens_per_minute = 30
    loopback_model.save()
    gateway.chat(model=loopback_model.key, request=BODY, cache="no-store")
    gateway.chat(model=loopback_model.key, request=BODY, cache="no-store")
    with pytest.raises(gateway.RateLimited):
        gateway.chat(model=loopback_model.key, request=BODY, cache="no-store")


@pytest.mark.django_db
def test_batch_caller_waits_instead_of_failing(
    loopback_model, openai_server, fast_gateway, settings, monkeypatch
):
    settings.GATEWAY_RATE_WINDOW_S = 1
    provider = loopback_model.provider
    provider.requests_per_minute = 2
    provider.save()
    waits = []
    monkeypatch.setattr(client, "sleep", lambda s: (waits.append(s), time.sleep(s)))
    started = time.monotonic()
    for _ in range(3):
        gateway.chat(model=loopback_model.key, request=BODY, cache="no-store", interactive=False)
    assert len(openai_server.calls()) == 3
    assert waits and all(0 < w <= 1.0 for w in waits)
    assert time.monotonic() - started >= 0.5  # the third call waited for the window
    calls = openai_server.calls()
    # Arrival times lag the limiter's hits by the transport (more on a busy machine).
    assert calls[2].at - calls[0].at >= 0.6


@pytest.mark.django_db
def test_batch_wait_past_the_deadline_fails(loopback_model, openai_server, fast_gateway, settings):
    settings.GATEWAY_RATE_WINDOW_S = 60
    provider = loopback_model.provider
    provider.requests_per_minute = 1
    provider.save()
    gateway.chat(model=loopback_model.key, request=BODY, cache="no-store")
    with pytest.raises(gateway.DeadlineExceeded):
        gateway.chat(
            model=loopback_model.key,
            request=BODY,
            cache="no-store",
            interactive=False,
            deadline_s=2,
        )


@pytest.mark.django_db(transaction=True)
def test_database_storage_moving_window():
    storage = DatabaseStorage()
    assert storage.check()
    assert storage.acquire_entry("k", 3, 1, amount=2)
    assert storage.acquire_entry("k", 3, 1)
    assert not storage.acquire_entry("k", 3, 1)
    assert not storage.acquire_entry("k", 3, 1, amount=4)
    start, count = storage.get_moving_window("k", 3, 1)
    assert count == 3 and time.time() - 1 < start <= time.time()
    time.sleep(1.05)
    assert storage.get_moving_window("k", 3, 1)[1] == 0
    assert storage.acquire_entry("k", 3, 1, amount=3)
    # The fixed-window half of the interface.
    assert storage.incr("f", 1) == 1 and storage.incr("f", 1, amount=2) == 3
    assert storage.get("f") == 3 and storage.get_expiry("f") > time.time()
    storage.clear("f")
    assert storage.get("f") == 0
    assert storage.reset() >= 1


HAMMER = """
import json, os, sys, time
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
from django.conf import settings
settings.DATABASES["default"]["NAME"] = sys.argv[1]  # the test database
import django
django.setup()
from jobs import gateway
from jobs.models import RegisteredModel
key, seconds = sys.argv[2], float(sys.argv[3])
# Warm up (imports, the SDK client) so that a limiter hit and its request stay close.
from django.core.cache import cache
from billing.models import LlmCall
from jobs.gateway import ratelimit
gateway.provider_for(RegisteredModel.objects.get(key=key).provider).client()
gateway.settings_effective(), cache.get("warm-up"), LlmCall.objects.exists()
ratelimit.limiter().storage.check()
print("ready", flush=True)
start_at = float(sys.stdin.readline())  # the same start for both processes
time.sleep(max(0.0, start_at - time.time()))
ok = limited = 0
starts = {}
while time.time() < start_at + seconds:
    marker = f"{os.getpid()}-{ok + limited}"
    body = {"messages": [{"role": "user", "content": f"hammer {marker}"}], "max_tokens": 4}
    began = time.time()
    try:
        gateway.chat(model=key, request=body, cache="no-store", interactive=True)
        ok += 1
        starts[marker] = began
    except gateway.RateLimited as exc:
        limited += 1
        time.sleep(min(exc.retry_after, 0.05))
print(json.dumps({"ok": ok, "limited": limited, "redis": bool(settings.REDIS_URL),
                  "starts": starts}))
"""


@pytest.mark.django_db(transaction=True)
def test_two_processes_share_one_limit(loopback_model, openai_server, settings):
    # A wide window: on a loaded CI machine one call can take a second from start to arrival.
    limit, window, seconds = 4, 4, 9.0
    settings.GATEWAY_RATE_WINDOW_S = window
    provider = loopback_model.provider
    provider.requests_per_minute = limit
    provider.save()
    env = {**os.environ, "GATEWAY_RATE_WINDOW_S": str(window), "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                HAMMER,
                connection.settings_dict["NAME"],
                loopback_model.key,
                str(seconds),
            ],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:  # both load Django and warm up, then start together
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read()[-3000:]
    start_at = time.time() + 0.3
    results = []
    for proc in procs:
        proc.stdin.write(f"{start_at}\n")
        proc.stdin.flush()
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["limited"] > 0 for r in results), results  # both met the shared limit
    assert all(r["redis"] == bool(settings.REDIS_URL) for r in results)
    calls = openai_server.calls()
    assert sum(r["ok"] for r in results) == len(calls)
    starts = {k: v for r in results for k, v in r["starts"].items()}
    # Each call's limiter hit lies between its start (in the process) and its arrival at the
    # server; the longest such span bounds how far an arrival lags its hit.
    arrivals = sorted(c.at for c in calls)
    lag = max(c.at - starts[c.body["messages"][0]["content"].split()[1]] for c in calls)
    assert lag < window / 2, lag
    # Never more than `limit` hits in any window: limit + 1 arrivals within (window - lag)
    # would mean limit + 1 hits within less than a window.
    busiest = max(
        sum(1 for t in arrivals if first <= t < first + window - lag) for first in arrivals
    )
    assert busiest <= limit, (busiest, lag, arrivals)
    # ... and the limit was used: the run saw about seconds / window windows' worth.
    assert len(arrivals) >= limit * int(seconds // window)
    ratelimit._limiter = None


def test_a_taken_slot_counts_a_little_longer_than_the_window(settings):
    """Requests reach the provider after they take a slot: the slot is held past the window
    (1 s per 30 s), so late arrivals never put the provider's own window over the limit."""
    from types import SimpleNamespace

    from jobs.gateway.ratelimit import held_s, limits_for

    settings.GATEWAY_RATE_WINDOW_S = 60
    provider = SimpleNamespace(slug="p", requests_per_minute=360, tokens_per_minute=None)
    model = SimpleNamespace(key="p/m", requests_per_minute=None, tokens_per_minute=None)
    (limit,) = limits_for(provider, model)
    item = limit.item()
    assert (item.amount, item.get_expiry()) == (360, 62)
    assert held_s(1) == 1 and held_s(30) == 31  # short test windows are left as they are
