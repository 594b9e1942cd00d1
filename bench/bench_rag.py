"""RAG: approximate (usearch HNSW) against exact (numpy) search at 100,000 chunks, and
knowledge-base build throughput with batched embedding against one call per chunk.

Index part (synthetic vectors, ``BENCH_RAG_N`` = 100,000 by default, 384 dims like MiniLM):
vectors drawn around 2,000 cluster centres (real embeddings cluster by topic; uniform random
vectors in 384 dimensions have no neighbours to find), normalised, stored as one segment
through config/storage.py and loaded the way a query loads them (corpora.rag.index). Queries
are stored vectors plus noise. Subject: ``LoadedIndex.dense`` on the usearch index that a
build makes above RAG_ANN_THRESHOLD; baseline: the same call with exact numpy top-k, same
queries, same run. Reported: p50/p95 per query and recall@10 of the approximate results
against the exact ones. Targets: p95 under 20 ms at recall@10 >= 0.95.

Embedding part (``BENCH_RAG_EMBED_N`` = 400 chunks): two corpora of distinct synthetic
sentences (so the gateway's cache cannot help either side), each built into a knowledge base
by ``knowledge_base_refresh`` (the build task's service: gateway calls with the offline
MiniLM, ledger rows, segment in storage, entries). Subject: batches of 64 chunks per call
(the default); baseline: one call per chunk. Target: batched >= 5x the per-chunk rate.

Order (bench/_alternate.py): in the index part the exact and the approximate search take
turns query by query, the first of the two flipping every query; in the embedding part the
two builds alternate for ``BENCH_RAG_ROUNDS`` rounds (default 2: batched, per-chunk,
per-chunk, batched), each build on a fresh corpus of its own seed. Every figure is a median
(or a percentile) of the same number of runs on both sides, printed with the IQR and min-max.
"""

from __future__ import annotations

import io
import json
import os
import random
import statistics
import time

import numpy as np

from bench._alternate import rotate, spread

DIMS = 384


def synthetic_vectors(n: int, *, centres: int = 2000, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(centres, DIMS)).astype(np.float32)
    labels = rng.integers(0, centres, size=n)
    vectors = centre[labels] + rng.normal(scale=0.6, size=(n, DIMS)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def percentile(values: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(values), p))


def bench_index() -> None:
    from corpora.rag import index as vindex

    n = int(os.environ.get("BENCH_RAG_N", "100000"))
    queries_n = int(os.environ.get("BENCH_RAG_QUERIES", "500"))
    vectors = synthetic_vectors(n)
    ids = np.arange(1, n + 1, dtype=np.int64)
    started = time.perf_counter()
    segment = vindex.write_segment("bench", 1, vectors, ids)
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    ann = vindex.build_ann(vectors)
    build_s = time.perf_counter() - started
    ann_info = vindex.save_ann("bench", 1, ann)
    manifest = {"segments": [segment], "dims": DIMS, "ann": ann_info, "next_segment": 2}
    started = time.perf_counter()
    vindex.cache.clear()
    loaded = vindex.cache.get("bench", 1, manifest)
    load_s = time.perf_counter() - started
    print(
        f"index: {n:,} vectors x {DIMS} d; segment {segment['bytes'] / 1e6:.1f} MB written in "
        f"{write_s:.2f} s; HNSW built in {build_s:.1f} s ({n / build_s:,.0f} vectors/s, "
        f"{ann_info['bytes'] / 1e6:.1f} MB); both loaded from storage in {load_s:.2f} s"
    )
    rng = np.random.default_rng(11)
    picks = rng.choice(n, size=queries_n, replace=False)
    queries = vindex.normalise(vectors[picks] + rng.normal(0, 0.05, size=(queries_n, DIMS)))
    everything = np.ones(n, dtype=bool)  # a mask forces the exact path
    for q in queries[:20]:  # warm-up (page faults, caches)
        loaded.dense(q, 10, mask=everything)
        loaded.dense(q, 10)
    current: dict = {}
    exact_found, approx_found = [], []

    def next_query(i: int, _order) -> None:
        current["q"] = queries[i]

    samples = rotate(
        [
            ("exact", lambda: exact_found.append(loaded.dense(current["q"], 10, mask=everything))),
            ("approx", lambda: approx_found.append(loaded.dense(current["q"], 10))),
        ],
        queries_n,
        on_round=next_query,
    )
    exact_ms, ann_ms = samples["exact"], samples["approx"]
    hits = sum(
        len({p for p, _ in exact} & {p for p, _ in approx})
        for exact, approx in zip(exact_found, approx_found, strict=True)
    )
    recall = hits / (10 * queries_n)
    build_recall = vindex.measure_recall(ann, vectors)
    print(
        f"subject  usearch HNSW (M={vindex.ANN_CONNECTIVITY}, ef={vindex.ANN_EXPANSION_SEARCH})"
        f"  p50 {percentile(ann_ms, 50):6.2f} ms  p95 {percentile(ann_ms, 95):6.2f} ms  "
        f"recall@10 {recall:.3f} (the build's own estimate: {build_recall:.3f})"
    )
    print(f"         {spread(ann_ms, unit='ms')}")
    print(
        f"baseline exact numpy top-k            p50 {percentile(exact_ms, 50):6.2f} ms  "
        f"p95 {percentile(exact_ms, 95):6.2f} ms  recall@10 1.000"
    )
    print(f"         {spread(exact_ms, unit='ms')}")
    ok = percentile(ann_ms, 95) < 20 and recall >= 0.95
    print(
        f"ratio exact/approximate p50 = {percentile(exact_ms, 50) / percentile(ann_ms, 50):.1f}x; "
        f"target p95 < 20 ms at recall@10 >= 0.95: {'met' if ok else 'NOT met'} "
        f"({queries_n} queries each, alternating, load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores)"
    )
    vindex.delete_files(vindex.manifest_paths(manifest))
    vindex.cache.clear()


WORDS = [
    "river",
    "mountain",
    "harbour",
    "lantern",
    "engine",
    "orchard",
    "library",
    "violin",
    "glacier",
    "market",
    "bridge",
    "comet",
    "archive",
    "meadow",
    "furnace",
    "compass",
    "garden",
    "tower",
    "ledger",
    "canyon",
    "beacon",
    "island",
    "workshop",
    "prairie",
    "observatory",
    "quarry",
    "monastery",
    "vineyard",
    "estuary",
    "citadel",
]


def synthetic_corpus(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    lines = []
    per_doc = 4
    for d in range(0, n, per_doc):
        chunks, text, start = [], "", 0
        for p in range(min(per_doc, n - d)):
            sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(25, 45)))
            sentence = sentence.capitalize() + f" ({seed}-{d}-{p})."
            if text:
                text += " "
                start = len(text)
            text += sentence
            chunks.append(
                {"position": p, "text": sentence, "start_char": start, "end_char": len(text)}
            )
        lines.append(
            json.dumps(
                {
                    "schema_version": "2",
                    "id": f"d{d}",
                    "title": f"Doc {d}",
                    "text": text,
                    "chunks": chunks,
                }
            )
        )
    return ("\n".join(lines) + "\n").encode()


def bench_embedding() -> None:
    from django.conf import settings

    from corpora import services as corpus_services
    from corpora.rag import services as rag

    n = int(os.environ.get("BENCH_RAG_EMBED_N", "400"))
    settings.GATEWAY_OFFLINE_DEVICE = os.environ.get("GATEWAY_OFFLINE_DEVICE", "cpu")
    rounds = int(os.environ.get("BENCH_RAG_ROUNDS", "2"))
    seeds = iter(range(1, 2 * rounds + 1))  # a fresh corpus a build: no cache hits

    def build(label: str, batch: int) -> float:  # chunks/s
        seed = next(seeds)
        corpus = corpus_services.corpus_create(
            name=f"bench {label} {seed}", upload=io.BytesIO(synthetic_corpus(n, seed)), user=None
        )
        # (The build task it enqueues finds the row claimed by this process, or no worker.)
        kb = rag.knowledge_base_create(
            name=f"bench {label} {seed}", corpus_ids=[corpus.pk], user=None
        )
        old = rag.EMBED_BATCH
        rag.EMBED_BATCH = batch
        try:
            started = time.perf_counter()
            done = rag.knowledge_base_refresh(kb_id=kb.pk)
            seconds = time.perf_counter() - started
        finally:
            rag.EMBED_BATCH = old
        assert done is not None and done.status == "ready", done and done.error
        assert done.chunk_count == n and done.last_build["embed_calls"] == -(-n // batch)
        print(
            f"{'subject ' if label == 'batched' else 'baseline'} build, {label:9} "
            f"(batch {batch:>2}): {n:,} chunks in {seconds:6.2f} s = {n / seconds:7.1f} "
            f"chunks/s, {done.last_build['embed_calls']} gateway calls"
        )
        rag.knowledge_base_delete(knowledge_base=done)
        return n / seconds

    # Load the model outside the timing.
    from jobs import gateway

    gateway.embed(model=rag.DEFAULT_EMBEDDING_MODEL, input=["warm up"], cache="no-store")
    samples = rotate(
        [
            ("batched", lambda: build("batched", rag.EMBED_BATCH)),
            ("per-chunk", lambda: build("per-chunk", 1)),
        ],
        rounds,
        self_timed=True,
    )
    rates = {label: statistics.median(values) for label, values in samples.items()}
    ratio = rates["batched"] / rates["per-chunk"]
    print(
        f"ratio batched/per-chunk = {ratio:.1f}x; target >= 5x: "
        f"{'met' if ratio >= 5 else 'NOT met'} (offline MiniLM on "
        f"{settings.GATEWAY_OFFLINE_DEVICE}, load average {os.getloadavg()[0]:.1f})"
    )
    print(
        f"chunks/s: batched {spread(samples['batched'], '.1f')}; per-chunk "
        f"{spread(samples['per-chunk'], '.1f')} ({rounds} builds each, alternating)"
    )


def main() -> None:
    bench_index()
    if os.environ.get("BENCH_RAG_SKIP_EMBED") != "1":
        bench_embedding()


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.run import main as run_all

    sys.argv = [sys.argv[0], "bench_rag"]
    run_all()
