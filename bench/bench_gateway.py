"""What the model gateway adds to an LLM call.

Subject: ``gateway.chat`` (model lookup, settings, cache key, breaker state, budget reservation
and settlement, the LlmCall ledger row, the openai SDK call) against the loopback
OpenAI-compatible server of the tests. Baseline: the same request sent directly with the
openai SDK (its own client, retries off) to the same server, in the same run: the two alternate
call by call (bench/_alternate.py, the order flipping every round), N calls each, and every
figure is a median (with its IQR and min-max) of the same number of calls on both sides.
Targets: under 2 ms median added; a cache hit under 1 ms in-process; the README's SLO,
gateway-added p95 under 10 ms.

Variants: "miss" (a priced model, default cache: reservation, ledger row, and the answer
stored), "no-store" (the same without the cache write), "free" (price 0: no reservation) and
"hit" (the stored answer; no request).
"""

import itertools
import logging
import statistics
import time
from decimal import Decimal

from bench._alternate import alternate, spread

N = 300


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _report(name: str, gateway_ms: list[float], direct_ms: list[float]) -> None:
    added = [g - d for g, d in zip(gateway_ms, direct_ms, strict=True)]
    print(
        f"{name:>9}: direct median {statistics.median(direct_ms):.2f} ms, gateway median "
        f"{statistics.median(gateway_ms):.2f} ms; added median "
        f"{statistics.median(gateway_ms) - statistics.median(direct_ms):.2f} ms "
        f"(paired median {statistics.median(added):.2f} ms), p99 gateway "
        f"{_pct(gateway_ms, 0.99):.2f} vs direct {_pct(direct_ms, 0.99):.2f} ms "
        f"(p99 added {_pct(gateway_ms, 0.99) - _pct(direct_ms, 0.99):.2f} ms); ratio "
        f"{statistics.median(gateway_ms) / statistics.median(direct_ms):.2f}"
    )
    print(
        f"{'':>9}  gateway {spread(gateway_ms, unit='ms')}; direct {spread(direct_ms, unit='ms')}"
    )
    # The README's SLO: gateway-added latency p95 under 10 ms (each call paired with the
    # direct call beside it, and the two distributions' p95s).
    print(
        f"{'':>9}  p95 gateway {_pct(gateway_ms, 0.95):.2f} vs direct {_pct(direct_ms, 0.95):.2f} "
        f"ms: added p95 {_pct(gateway_ms, 0.95) - _pct(direct_ms, 0.95):.2f} ms, paired p95 "
        f"{_pct(added, 0.95):.2f} ms (SLO < 10 ms)"
    )


def main() -> None:
    import openai

    from billing import services as billing
    from jobs import gateway
    from jobs.models import Provider, RegisteredModel
    from tests.jobs.openai_server import OpenAIServer

    for name in ("crucible.gateway", "httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    server = OpenAIServer()
    try:
        provider = Provider.objects.create(
            slug="bench", name="Bench loopback", kind="openai", base_url=server.url
        )
        priced = RegisteredModel.objects.create(
            provider=provider,
            remote_id="bench-chat",
            price_input_per_m=Decimal("0.5"),
            price_output_per_m=Decimal("1.5"),
            capabilities=["chat"],
        )
        free = RegisteredModel.objects.create(
            provider=provider,
            remote_id="bench-free",
            price_input_per_m=0,
            price_output_per_m=0,
            capabilities=["chat"],
        )
        billing.budget_set(user=None, amount=Decimal("1000000"))
        direct = openai.OpenAI(base_url=server.url, api_key="bench", max_retries=0)
        body = {"messages": [{"role": "user", "content": "How much is a latte?"}], "max_tokens": 16}

        def call_direct() -> None:
            direct.chat.completions.create(model="bench-chat", **body)

        run_index = itertools.count()  # a fresh run index a call: every "miss" is one
        variants = {
            "miss": lambda: gateway.chat(model=priced.key, request=body, run_index=next(run_index)),
            "no-store": lambda: gateway.chat(model=priced.key, request=body, cache="no-store"),
            "free": lambda: gateway.chat(model=free.key, request=body, cache="no-store"),
        }
        for name, fn in variants.items():
            for _ in range(20):  # warm-up: connections, imports, the first queries
                fn()
                call_direct()
            gateway_ms, direct_ms = alternate(fn, call_direct, N)
            _report(name, gateway_ms, direct_ms)

        # A yardstick of this machine's speed: one indexed single-row ORM read.
        reads = []
        for _ in range(N):
            started = time.perf_counter()
            RegisteredModel.objects.filter(key=priced.key).first()
            reads.append((time.perf_counter() - started) * 1000)
        print(f"yardstick: one ORM row read, median {statistics.median(reads):.3f} ms")

        gateway.chat(model=priced.key, request=body)  # store it
        hits = []
        for _ in range(N):
            started = time.perf_counter()
            result = gateway.chat(model=priced.key, request=body)
            hits.append((time.perf_counter() - started) * 1000)
            assert result.meta.cached
        print(
            f"      hit: median {statistics.median(hits):.2f} ms, p99 {_pct(hits, 0.99):.2f} ms "
            f"(lookup + ledger row; no request); vs a direct call: "
            f"{statistics.median(hits) / statistics.median(direct_ms):.2f}x"
        )
    finally:
        server.close()
