# ruff: noqa: S603  (the bench starts its own fixed commands: migrate, gunicorn, redis-server)
"""Load test: POST /v1/chat through the gateway to the loopback OpenAI server, at rising
request rates, against a real gunicorn server on 127.0.0.1 (loopback only, bounded in time).

    .venv/bin/python bench/bench_load.py [--rates 5,10,20,40,80] [--stage-s 8] [--workers 2]

Each stage is open-loop (requests start on schedule whatever the answers do) for
``--stage-s`` seconds, half cache hits (the same prompt) and half misses (a fresh prompt);
it prints achieved req/s, p50/p95/p99 and errors per stage, and the highest rate that met
the SLO (README, "Service level objectives": cache-hit p95 < 50 ms, error rate < 0.1%).

Redis phase (production mode only: ``redis-server`` on PATH and ``--redis``): the bench
starts its own redis-server on a free port, points the app at it (cache, rate limits,
broker), stops Redis halfway through a steady stage, records /readyz and the answers, then
restarts Redis and checks that readiness and answers recover. In embedded mode (no Redis)
that phase is skipped and the bench says so. PostgreSQL is used when DATABASE_URL is set.

Why not locust: it pulls gevent and a web UI for what fifty lines of asyncio + httpx do
here, and its headless mode cannot hold an open-loop schedule per stage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PY = str(REPO / ".venv" / "bin" / "python")
SLO_HIT_P95_MS = 50.0
SLO_ERROR_RATE = 0.001


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = max(0, min(len(values) - 1, round(q * (len(values) - 1))))
    return values[k]


def setup_app(env: dict, loop_url: str) -> str:
    """Migrate, create (or reuse) the bench user with a fresh token and the loopback provider;
    returns the token."""
    subprocess.run([PY, "manage.py", "migrate", "-v0"], cwd=REPO, env=env, check=True)
    code = f"""
from config.roles import Role
from config.services import user_create, user_token_rotate
from jobs.models import Provider, RegisteredModel
from django.contrib.auth import get_user_model
# Idempotent: a second run on the same DATABASE_URL reuses the user and points the provider
# at this run's loopback server.
u = get_user_model().objects.filter(username="bench").first()
u = u or user_create(username="bench", role=Role.ENGINEER, actor=None)
t = user_token_rotate(user=u, actor=None)
p, _ = Provider.objects.update_or_create(slug="bench-loop", defaults=dict(name="Loopback",
    kind="openai", base_url="{loop_url}", timeout_s=5))
RegisteredModel.objects.get_or_create(key="bench-loop/test-chat", defaults=dict(provider=p,
    remote_id="test-chat", display_name="Loopback", price_input_per_m=1,
    price_output_per_m=2, price_source="admin", capabilities=["chat"]))
print(t.key)
"""
    out = subprocess.run(
        [PY, "manage.py", "shell", "-c", code],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


async def one(client: httpx.AsyncClient, token: str, hit: bool, i: int, results: list) -> None:
    prompt = "What is the capital of France?" if hit else f"Question {i} at {time.time_ns()}"
    started = time.perf_counter()
    try:
        r = await client.post(
            "/v1/chat",
            json={
                "model": "bench-loop/test-chat",
                "prompt": prompt,
                "controls": {"max_tokens": 16, "temperature": 0},
            },
            headers={"Authorization": f"Bearer {token}"},
        )
        ok = r.status_code == 200
        code = r.status_code
        cached = bool(ok and r.json().get("cache_hit"))
    except httpx.HTTPError as exc:
        ok, code, cached = False, type(exc).__name__, False
    results.append(((time.perf_counter() - started) * 1000, ok, code, hit, cached))


async def stage(base: str, token: str, rate: float, seconds: float) -> dict:
    results: list = []
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=10, limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, token, i % 2 == 0, i, results)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    lat = [r[0] for r in results if r[1]]
    hits = [r[0] for r in results if r[1] and r[4]]
    errors = [r for r in results if not r[1]]
    return {
        "rate": rate,
        "sent": len(results),
        "achieved": len(results) / elapsed,
        "p50": pct(lat, 0.5),
        "p95": pct(lat, 0.95),
        "p99": pct(lat, 0.99),
        "hit_p95": pct(hits, 0.95),
        "errors": len(errors),
        "error_codes": sorted({str(e[2]) for e in errors}),
    }


def show(s: dict) -> None:
    f = lambda v: "-" if v is None else f"{v:7.1f}"  # noqa: E731
    print(
        f"{s['rate']:6.0f} req/s target  {s['achieved']:6.1f} achieved  p50 {f(s['p50'])}  "
        f"p95 {f(s['p95'])}  p99 {f(s['p99'])} ms  hit-p95 {f(s['hit_p95'])} ms  "
        f"errors {s['errors']}/{s['sent']} {','.join(s['error_codes'])}"
    )


def readyz(base: str) -> str:
    try:
        r = httpx.get(base + "/readyz", timeout=5)
        body = r.json()
        return f"{r.status_code} {body.get('status')} degraded={body.get('degraded')}"
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="5,10,20,40,80")
    ap.add_argument("--stage-s", type=float, default=8.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--redis", action="store_true", help="run the Redis-outage phase")
    args = ap.parse_args()

    from tests.jobs.openai_server import OpenAIServer

    loop = OpenAIServer()
    data = Path(tempfile.mkdtemp(prefix="crucible-load-"))
    env = {
        **os.environ,
        "CRUCIBLE_DATA_DIR": str(data),
        "API_RATE_LIMIT": "1000000/m",
        "DJANGO_SETTINGS_MODULE": "config.settings",
    }
    redis_proc = None
    if args.redis:
        if not shutil.which("redis-server"):
            sys.exit("--redis needs redis-server on PATH")
        redis_port = free_port()
        redis_cmd = ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"]
        redis_proc = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL)
        env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        time.sleep(0.5)
        mode = "production (Redis" + (", PostgreSQL)" if env.get("DATABASE_URL") else ", SQLite)")
    else:
        env.pop("REDIS_URL", None)
        db = "PostgreSQL" if env.get("DATABASE_URL") else "SQLite"
        mode = f"no Redis ({db}, filesystem broker, database cache)"
    token = setup_app(env, loop.url)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # The server's own log (closed in the finally below), kept when a request failed so the
    # cause of a 5xx is on disk instead of lost.
    web_log = tempfile.NamedTemporaryFile(  # noqa: SIM115
        "w", prefix="crucible-load-web-", suffix=".log", delete=False
    )
    web = subprocess.Popen(
        [
            str(REPO / ".venv" / "bin" / "gunicorn"),
            "config.wsgi",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(args.workers),
            "--threads",
            "4",
            "--access-logfile",
            "/dev/null",
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        env=env,
        stderr=web_log,
    )
    errors_seen = 0
    try:
        for _ in range(100):
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        print(f"mode: {mode}; {args.workers} gunicorn workers x 4 threads; stage {args.stage_s} s")
        print(f"SLO: cache-hit p95 < {SLO_HIT_P95_MS} ms, error rate < {SLO_ERROR_RATE:.1%}")
        asyncio.run(stage(base, token, 5, 1))  # warm-up
        best = None
        for rate in [float(r) for r in args.rates.split(",")]:
            s = asyncio.run(stage(base, token, rate, args.stage_s))
            show(s)
            errors_seen += s["errors"]
            met = (s["hit_p95"] or 1e9) < SLO_HIT_P95_MS and s["errors"] / s[
                "sent"
            ] < SLO_ERROR_RATE
            if met:
                best = s
        print(
            f"sustained at the SLO: {best['achieved']:.1f} req/s"
            if best
            else "sustained at the SLO: none of the rates met it"
        )
        if redis_proc is None:
            print(
                "Redis phase: skipped (embedded mode has no Redis; run with --redis in "
                "production mode)"
            )
            return
        rate = best["rate"] if best else 5.0
        print(f"Redis phase at {rate:.0f} req/s: before {readyz(base)}")
        redis_proc.terminate()
        redis_proc.wait()
        time.sleep(0.5)
        print(f"  Redis stopped: readyz {readyz(base)}")
        s = asyncio.run(stage(base, token, rate, args.stage_s / 2))
        show(s)
        errors_seen += s["errors"]
        redis_proc = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL)
        time.sleep(1.0)
        print(f"  Redis back: readyz {readyz(base)}")
        s = asyncio.run(stage(base, token, rate, args.stage_s / 2))
        show(s)
        errors_seen += s["errors"]
    finally:
        web.terminate()
        try:
            web.wait(15)
        except subprocess.TimeoutExpired:  # a worker busy past gunicorn's graceful timeout
            web.kill()
            web.wait(5)
        loop.close()
        if redis_proc is not None:
            redis_proc.terminate()
        shutil.rmtree(data, ignore_errors=True)
        web_log.close()
        if errors_seen:
            print(f"server log (kept, {errors_seen} failed requests): {web_log.name}")
        else:
            os.unlink(web_log.name)
        print(f"loopback server saw {len(loop.calls())} chat calls")


if __name__ == "__main__":
    main()
