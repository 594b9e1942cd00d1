"""Batch LLM jobs: throughput through the whole path, overhead per task, memory of task creation.

1. Throughput: a job on the loopback OpenAI server (50 ms per call) with a rate limit of
   BENCH_BATCH_RPM requests per moving 60-s window (GATEWAY_RATE_WINDOW_S; how providers count
   "per minute"), run by a real Celery worker (BENCH_BATCH_CONCURRENCY processes, queues
   long+control) through dispatch windows, the gateway (rate limiter, ledger, cache) and the
   database; the job spans more than two windows, so the figure is the calls the loopback
   server received in each whole window after the first (the sustained rate under the limit),
   with the most in any window (never above the limit) and the unthrottled pace while a window
   still had room. A sequential loop of the same calls with the openai SDK runs first in the
   same run as a yardstick of the server's speed. Target: sustained within 10% of the limit.
2. Overhead per task: the same tasks run in process (claim, prompt, gateway, validation, result
   write, window top-up) on a server without latency, minus the direct SDK calls, per task.
   Target: under 5 ms. The two sides alternate job by job (bench/_alternate.py: the order
   flips every round), BENCH_BATCH_ROUNDS rounds (default 3), each round a fresh job on a
   fresh model key (so the gateway's cache never answers); the figures are medians of the same
   number of jobs on both sides, with their IQR and min-max, after one unmeasured warm-up job.
3. Task creation: wall time and Python peak memory (tracemalloc) of bulk-creating 1,000 to
   100,000 task rows from a generator. Target: flat memory. No baseline.

The throughput part is measured once and not alternated: its subject is a whole job run by a
Celery worker started for it (8 s of start-up, then a rate-limited job of BENCH_BATCH_TASKS
calls), and its figure is the share of the rate limit reached, not a ratio; the sequential SDK
loop printed beside it (run just before) is a yardstick of the loopback server's speed.

Sizes: BENCH_BATCH_TASKS (default 920), BENCH_BATCH_RPM (default 360), BENCH_BATCH_SIZES,
BENCH_BATCH_ROUNDS (default 3); BENCH_BATCH_PARTS (default creation,overhead,throughput).
"""

from __future__ import annotations

import io
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

from bench._alternate import rotate, spread

ROOT = Path(__file__).resolve().parent.parent


def _setup(server, rpm: int | None, slug: str):
    from jobs.models import Provider, RegisteredModel

    provider = Provider.objects.create(
        slug=slug, name=slug, kind="openai", base_url=server.url, requests_per_minute=rpm
    )
    return RegisteredModel.objects.create(
        provider=provider,
        remote_id="bench-chat",
        key=f"{slug}/bench-chat",
        price_input_per_m=1,
        price_output_per_m=2,
        price_source="admin",
        capabilities=["chat"],
    )


def _corpus():
    from corpora import services as corpus_services

    data = (ROOT / "samples" / "corpus" / "narratives.jsonl").read_bytes()
    return corpus_services.corpus_create(
        name="Bench narratives", upload=io.BytesIO(data), user=None
    )


def _job(corpus, model, n_tasks: int, *, start: bool):
    from jobs.batch import services

    chunks = list(corpus.chunks.order_by("pk").values_list("pk", flat=True))
    runs = max(1, min(20, n_tasks // (2 * len(chunks)) or 1))
    per_chunk = 2 * runs
    chunk_ids = chunks[: max(1, n_tasks // per_chunk)]
    return services.job_create(
        user=None,
        corpus_id=corpus.pk,
        selection={"chunk_ids": chunk_ids},
        frameworks=["narrative_salience", "moral_foundations"],
        models=[model.key],
        runs=runs,
        decoding={"max_tokens": 64},
        start=start,
    )


def _direct(server, job) -> float:
    """The same requests, sequentially, with the openai SDK (no platform): seconds."""
    import json

    import openai

    from jobs.batch import services

    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0)
    bodies = [json.loads(line)["body"] for line in services.openai_batch_requests(job=job)]
    started = time.perf_counter()
    for body in bodies:
        client.chat.completions.create(**body)
    return time.perf_counter() - started


def _windows(arrivals: list[float], window: float) -> tuple[list[int], int]:
    """Calls that arrived in each whole window after the first call, and the most that
    arrived in any window of that length (two pointers over the sorted arrival times)."""
    if not arrivals:
        return [], 0
    times = sorted(arrivals)
    first = times[0]
    whole = int((times[-1] - first) // window)
    per = [0] * whole
    for t in times:
        k = int((t - first) // window)
        if k < whole:
            per[k] += 1
    busiest, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        busiest = max(busiest, hi - lo + 1)
    return per, busiest


def throughput(corpus, n_tasks: int, rpm: int, concurrency: int) -> None:
    from django.conf import settings

    from jobs.batch.models import BatchJob
    from tests.jobs.batch_support import json_completion
    from tests.jobs.openai_server import OpenAIServer

    server = OpenAIServer(latency=0.05)
    server.completion = json_completion
    window = max(1, int(settings.GATEWAY_RATE_WINDOW_S))
    try:
        model = _setup(server, rpm, "bench-rl")
        job = _job(corpus, model, n_tasks, start=False)
        direct_s = _direct(server, job)
        server.reset()
        env = {**os.environ, "BATCH_LIVE_STATS": "0", "PYTHONPATH": str(ROOT)}
        log = Path(settings.DATA_DIR) / "bench-batch-worker.log"
        worker = subprocess.Popen(  # noqa: S603 - our own celery executable
            [
                str(Path(sys.executable).parent / "celery"),
                "-A",
                "config.celery",
                "worker",
                "-Q",
                "long,control",
                "-c",
                str(concurrency),
                "--loglevel=WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=ROOT,
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            time.sleep(8)  # the worker's start (imports), not part of the measurement
            from jobs.batch import services

            started = time.perf_counter()
            services.job_resume(job=BatchJob.objects.get(pk=job.pk))
            services.enqueue_dispatch(job.pk)
            while BatchJob.objects.get(pk=job.pk).status == "running":
                time.sleep(0.2)
                if time.perf_counter() - started > 1800:
                    raise RuntimeError("the job did not finish in 30 minutes")
            wall = time.perf_counter() - started
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a warm shutdown stuck on a busy machine
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        done = job.tasks.filter(status="succeeded").count()
        arrivals = [c.at for c in server.calls()]
        per_window, busiest = _windows(arrivals, window)
        # The first window's calls go out as fast as the platform can send them (the limit is
        # "rpm per moving minute", as providers count it): that span is its capacity.
        first = sorted(arrivals)[: min(rpm, len(arrivals))]
        burst = (len(first) - 1) / (first[-1] - first[0]) if len(first) > 1 else 0.0
        print(
            f"throughput: {done}/{job.task_count} tasks in {wall:.1f} s through Celery "
            f"({concurrency} processes) + gateway + DB at a limit of {rpm} requests per "
            f"{window} s ({rpm / window:.2f}/s); sequential SDK loop of the same calls: "
            f"{job.task_count / direct_s:.2f} calls/s ({1000 * direct_s / job.task_count:.1f} ms "
            f"each, 50 ms server latency)"
        )
        if len(per_window) >= 2:
            steady = per_window[1:]
            share = min(steady) / rpm
            print(
                f"  calls per whole {window}-s window: {per_window}; sustained after the first: "
                f"{min(steady)}-{max(steady)} = {100 * share:.0f}% of the limit (target >= 90%); "
                f"most in any {window}-s window {busiest} (limit {rpm}: "
                f"{'never exceeded' if busiest <= rpm else 'EXCEEDED'}); unthrottled pace "
                f"while the window had room {burst:.1f} calls/s"
            )
        else:
            print(
                f"  the job spanned under two {window}-s windows: no sustained figure "
                f"(raise BENCH_BATCH_TASKS or lower BENCH_BATCH_RPM); most in any window "
                f"{busiest} (limit {rpm}); pace {burst:.1f} calls/s"
            )
    finally:
        server.close()


def overhead(corpus, n_tasks: int, rounds: int) -> None:
    from jobs.batch import results, services
    from tests.jobs.batch_support import json_completion
    from tests.jobs.openai_server import OpenAIServer

    server = OpenAIServer()
    server.completion = json_completion
    results.STATS_EVERY_S = 10**9
    try:
        # One job a round, each on its own model key: the gateway's cache cannot answer.
        jobs = [
            _job(corpus, _setup(server, None, f"bench-fast-{r}"), n_tasks, start=False)
            for r in range(rounds)
        ]
        n = jobs[0].task_count
        warm = _job(corpus, _setup(server, None, "bench-fast-warm"), n_tasks, start=False)
        _direct(server, warm)  # warm-up of both sides, not measured: imports, first queries
        services.job_run_inline(job=warm)
        queue = {"platform": iter(jobs), "direct": iter(jobs)}

        def platform() -> float:  # ms per task
            job = next(queue["platform"])
            started = time.perf_counter()
            services.job_run_inline(job=job)
            seconds = time.perf_counter() - started
            assert job.tasks.filter(status="succeeded").count() == n
            return 1000 * seconds / n

        def direct() -> float:  # ms per call
            return 1000 * _direct(server, next(queue["direct"])) / n

        ms = rotate([("platform", platform), ("direct", direct)], rounds, self_timed=True)
        platform_ms, direct_ms = statistics.median(ms["platform"]), statistics.median(ms["direct"])
        added = [p - d for p, d in zip(ms["platform"], ms["direct"], strict=True)]
        print(
            f"overhead: {n} tasks in process {platform_ms:.2f} ms/task vs direct SDK "
            f"{direct_ms:.2f} ms/call: platform adds {platform_ms - direct_ms:.2f} ms per task "
            f"(target < 5 ms)"
        )
        print(
            f"  platform {spread(ms['platform'], unit='ms')}; "
            f"direct {spread(ms['direct'], unit='ms')}; "
            f"added per round {spread(added, unit='ms')} ({rounds} jobs each, alternating)"
        )
    finally:
        server.close()


def creation(corpus, sizes: list[int]) -> None:
    from jobs.batch import services
    from jobs.batch.models import BatchJob, FrameworkVersion

    fw = FrameworkVersion.objects.select_related("framework").first()
    chunk = corpus.chunks.first()
    for size in sizes:
        job = BatchJob.objects.create(name=f"bench {size}", corpus=corpus, runs=1, task_count=size)
        # What job_create inserts: one spec per (chunk x framework x model x run), generated.
        label = fw.label
        rows = (
            services.TaskSpec(chunk.pk, fw.pk, label, f"m/{i // 20}", i % 20 + 1)
            for i in range(size)
        )
        tracemalloc.start()
        started = time.perf_counter()
        created = services.tasks_bulk_insert(job_id=job.pk, specs=rows)
        wall = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(
            f"creation: {created:>7} tasks in {wall:6.2f} s ({created / wall:,.0f}/s), "
            f"peak Python memory {peak / 2**20:.1f} MiB"
        )
        job.delete()


def main() -> None:
    for name in ("crucible.gateway", "httpx", "httpx2", "openai", "crucible.batch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from jobs.batch import services

    services.framework_sync()
    corpus = _corpus()
    parts = set(os.environ.get("BENCH_BATCH_PARTS", "creation,overhead,throughput").split(","))
    n_tasks = int(os.environ.get("BENCH_BATCH_TASKS", "920"))
    sizes = [int(s) for s in os.environ.get("BENCH_BATCH_SIZES", "1000,10000,100000").split(",")]
    if "creation" in parts:
        creation(corpus, sizes)
    if "overhead" in parts:
        overhead(corpus, min(n_tasks, 200), int(os.environ.get("BENCH_BATCH_ROUNDS", "3")))
    if "throughput" in parts:
        throughput(
            corpus,
            n_tasks,
            int(os.environ.get("BENCH_BATCH_RPM", "360")),
            int(os.environ.get("BENCH_BATCH_CONCURRENCY", "4")),
        )
