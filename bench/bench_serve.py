"""The model server (gpu/serve.py): dynamic batching against one request at a time.

Subject: 16 concurrent chat requests (greedy, 32 new tokens) spread over 3 LoRA adapters,
sent over HTTP to uvicorn with dynamic batching (window 50 ms, up to 16 rows a call, adapters
mixed in one batch).
Baseline, in the same run: the same server with batching off (max batch 1), i.e. one
``generate`` per request. Target: batching serves at least 3x the requests a second.
Also: adapter switch cost (loading an adapter, and alternating between resident adapters
against staying on one), and time to first token of a streamed answer.

Runs on the GPU when one is there (``--device auto``), else on the CPU; the device is printed
with the figures. The two modes run in alternating order for BENCH_SERVE_ROUNDS rounds each
(default 2; medians with their spread). No Django needed (the server is Django-free), so it
also runs alone: ``python bench/bench_serve.py``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._alternate import rotate, spread  # noqa: E402

CONCURRENT = 16
ADAPTERS = 3
MAX_TOKENS = 32
QUESTIONS = [
    "How do I start an emergency fund?",
    "What is compound interest?",
    "Should I pay off debt or save first?",
    "How much should I keep in cash?",
]


def _adapters(base_dir: Path, root: Path) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(ADAPTERS):
        torch.manual_seed(200 + i)
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        config = LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        target = root / f"adapter-{i}"
        get_peft_model(model, config).save_pretrained(str(target))
        paths.append(target)
    return paths


class Server:
    def __init__(self, base_dir: Path, adapter_root: Path, *, batch: bool, device: str):
        import socket

        import uvicorn

        from gpu.serve import Engine, create_app

        self.engine = Engine(
            base_dir,
            base_id="smollm2-135m-instruct",
            device=device,
            max_adapters=ADAPTERS,
            batch_window_ms=50 if batch else 0,
            max_batch=16 if batch else 1,
            adapter_root=adapter_root,
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        app = create_app(self.engine, embeddings=False)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _chat(client, model: str, question: str) -> dict:
    response = client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        },
        timeout=600,
    )
    response.raise_for_status()
    return response.json()


def _burst(url: str, names: list[str]) -> tuple[float, list[dict]]:
    import httpx

    requests = [(names[i % len(names)], QUESTIONS[i % len(QUESTIONS)]) for i in range(CONCURRENT)]
    with httpx.Client(base_url=url, limits=httpx.Limits(max_connections=CONCURRENT)) as client:
        for name in names:  # adapters resident, model warm: the burst measures serving only
            _chat(client, name, "warm up")
        started = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENT) as pool:
            answers = list(pool.map(lambda r: _chat(client, *r), requests))
        return time.perf_counter() - started, answers


def _ttft(url: str, model: str, runs: int = 5) -> list[float]:
    import httpx

    samples = []
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTIONS[0]}],
        "max_tokens": MAX_TOKENS,
        "stream": True,
    }
    with httpx.Client(base_url=url) as client:
        for _ in range(runs):
            started = time.perf_counter()
            first = None
            with client.stream("POST", "/v1/chat/completions", json=body, timeout=600) as r:
                for line in r.iter_lines():  # read to the end so the server finishes the row
                    if first is None and '"content": "' in line and '"content": ""' not in line:
                        first = (time.perf_counter() - started) * 1000
            samples.append(first)
    return samples


def _switch_cost(url: str, names: list[str], rounds: int = 6) -> tuple[float, float]:
    """Milliseconds per generated token: alternating between resident adapters, and staying
    on one (per token, since adapters answer at different lengths)."""
    import httpx

    def run(order: list[str]) -> float:
        started, tokens = time.perf_counter(), 0
        for name in order:
            tokens += _chat(client, name, QUESTIONS[1])["usage"]["completion_tokens"]
        return (time.perf_counter() - started) * 1000 / max(1, tokens)

    with httpx.Client(base_url=url) as client:
        alternating = run([names[i % len(names)] for i in range(rounds)])
        same = run([names[0]] * rounds)
    return alternating, same


def main() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("CRUCIBLE_MODEL_CACHE", str(REPO / "var" / "models"))
    from gpu.generate import resolve_device
    from gpu.model import ensure_offline_model

    device = resolve_device(os.environ.get("BENCH_DEVICE", "auto"))
    base_dir = ensure_offline_model("SmolLM2-135M-Instruct")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        names = [p.name for p in _adapters(base_dir, root)]
        rounds = int(os.environ.get("BENCH_SERVE_ROUNDS", "2"))
        modes = (("one at a time", False), ("dynamic batching", True))
        # Both servers stay up for the whole run; the bursts alternate which mode goes first
        # each round (bench/_alternate.py), the same number of rounds on each side.
        servers = {
            label: Server(base_dir, root, batch=batch, device=device) for label, batch in modes
        }
        try:
            answers: dict[str, list[dict]] = {}

            def burst(label: str):
                def run() -> float:
                    seconds, out = _burst(servers[label].url, names)
                    answers.setdefault(label, out)
                    return seconds

                return run

            samples = rotate([(label, burst(label)) for label, _ in modes], rounds, self_timed=True)
            for label, _ in modes:
                seconds = statistics.median(samples[label])
                sizes = [a["crucible"]["batch_size"] for a in answers[label]]
                tokens = sum(a["usage"]["completion_tokens"] for a in answers[label])
                print(
                    f"{label:17s}: {CONCURRENT} requests over {ADAPTERS} adapters in "
                    f"{seconds:6.2f} s = {CONCURRENT / seconds:6.2f} req/s, "
                    f"{tokens / seconds:7.1f} tok/s; batch sizes {sorted(set(sizes))}, "
                    f"{servers[label].engine.stats['batches']} generate calls in all"
                )
                print(f"  {spread(samples[label], unit='s')} ({rounds} rounds, alternating)")
            batched_server = servers["dynamic batching"]
            loads = batched_server.engine.stats
            load_ms = 1000 * loads["adapter_load_s"] / max(1, loads["adapter_loads"])
            alternating, same = _switch_cost(batched_server.url, names)
            ttft = _ttft(batched_server.url, names[0])
            ttft_base = _ttft(batched_server.url, "smollm2-135m-instruct")
        finally:
            for server in servers.values():
                server.stop()
        one = statistics.median(samples["one at a time"])
        batched = statistics.median(samples["dynamic batching"])
        pairs = zip(answers["one at a time"], answers["dynamic batching"], strict=True)
        same_text = sum(
            a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
            for a, b in pairs
        )
        print(
            f"speed-up: {one / batched:.2f}x requests/s (target >= 3x) on {device}; "
            f"answers identical to one-at-a-time: {same_text}/{CONCURRENT}"
        )
        print(
            f"adapter switch: loading one {load_ms:.0f} ms; requests alternating between "
            f"resident adapters {alternating:.1f} ms/token vs {same:.1f} ms/token on one adapter"
        )
        print(
            f"time to first token (streamed, one request): adapter median "
            f"{statistics.median(ttft):.0f} ms, base median {statistics.median(ttft_base):.0f} ms"
        )


if __name__ == "__main__":
    main()
