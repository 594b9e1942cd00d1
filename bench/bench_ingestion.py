"""Corpus ingestion: records per second and memory, against plain jsonschema.

Subject: ``corpora.services.corpus_create`` on a generated JSONL corpus (default 100 MB,
``BENCH_INGEST_MB`` to change): streaming validation (orjson + compiled schema), the
duplicate-id checks, batched inserts of documents and chunks, statistics, checksum and
the stored copy, all in one transaction. Baseline: the same file validated line by
line with ``json.loads`` and ``jsonschema.Draft202012Validator.is_valid`` (what a plain
implementation does), in the same run. Target: at least 20,000 records per second.

Subject and baseline alternate (bench/_alternate.py: the order flips every round) for
``BENCH_INGEST_ROUNDS`` rounds (default 3), each round a new corpus from the same file; the
rates are medians of the same number of runs on both sides, printed with their IQR and
min-max, and the subject's stored metrics are those of its first run.

Memory: the peak resident set during ingestion is sampled for a file a tenth of the
size and for the full one; constant-memory ingestion shows about the same peak.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench._alternate import rotate, spread

WORDS = [
    "the",
    "people",
    "nation",
    "freedom",
    "future",
    "we",
    "must",
    "stand",
    "together",
    "history",
    "justice",
    "work",
    "families",
    "economy",
    "change",
    "hope",
    "power",
    "government",
    "country",
    "children",
    "promise",
    "world",
    "today",
    "tomorrow",
    "citizens",
    "democracy",
    "security",
    "peace",
    "strength",
    "courage",
    "community",
    "opportunity",
    "responsibility",
    "challenge",
    "generation",
    "american",
    "century",
    "union",
    "liberty",
]
TYPES = ("speech", "op-ed", "interview", "debate", "press_release")
LANGS = ("en", "en", "en", "fr", "de")


def make_record(i: int, rng: random.Random) -> dict:
    from corpora.tokens import count_tokens

    words = [rng.choice(WORDS) for _ in range(rng.randint(40, 80))]
    text = " ".join(words).capitalize() + "."
    half = len(text) // 2
    cut = text.rfind(" ", 0, half) if text.rfind(" ", 0, half) > 0 else half
    return {
        "id": f"doc-{i:08d}",
        "title": f"Document {i}",
        "text": text,
        "document_type": TYPES[i % len(TYPES)],
        "author": f"Author {i % 97}",
        "date": f"{1950 + i % 70}-{1 + i % 12:02d}-{1 + i % 28:02d}",
        "language": LANGS[i % len(LANGS)],
        "metadata": {"topic": WORDS[i % len(WORDS)], "year": 1950 + i % 70},
        "extensions": {"narrative": {"speaker": f"Speaker {i % 50}", "medium": "speech"}},
        # As build_corpus writes them: text, offsets and token counts.
        "chunks": [
            {
                "position": 0,
                "text": text[:cut],
                "token_count": count_tokens(text[:cut]),
                "start_char": 0,
                "end_char": cut,
            },
            {
                "position": 1,
                "text": text[cut + 1 :],
                "token_count": count_tokens(text[cut + 1 :]),
                "start_char": cut + 1,
                "end_char": len(text),
            },
        ],
    }


def write_corpus(path: Path, megabytes: float, seed: int = 7) -> int:
    rng = random.Random(seed)
    target = int(megabytes * 1_000_000)
    written = count = 0
    with path.open("wb") as handle:
        while written < target:
            line = json.dumps(make_record(count, rng), separators=(",", ":")).encode() + b"\n"
            handle.write(line)
            written += len(line)
            count += 1
    return count


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples the resident set size every 20 ms while in the ``with`` block."""

    def __enter__(self):
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 1e6


def ingest(path: Path, name: str):
    from corpora.services import corpus_create

    with PeakRss() as rss, path.open("rb") as handle:
        started = time.perf_counter()
        corpus = corpus_create(name=name, upload=handle, user=None, filename=path.name)
        seconds = time.perf_counter() - started
    return corpus, seconds, rss


def baseline(path: Path) -> tuple[int, float]:
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    from corpora.schemas import _load, corpus_schema_path, extension_schemas

    registry = Registry().with_resources(
        (s["$id"], Resource.from_contents(s)) for s in extension_schemas()
    )
    validator = Draft202012Validator(_load(corpus_schema_path("2")), registry=registry)
    started = time.perf_counter()
    count = 0
    with path.open("rb") as handle:
        for line in handle:
            assert validator.is_valid(json.loads(line))
            count += 1
    return count, time.perf_counter() - started


def main() -> None:
    megabytes = float(os.environ.get("BENCH_INGEST_MB", "100"))
    folder = Path(tempfile.mkdtemp(prefix="crucible-ingest-"))
    small, large = folder / "small.jsonl", folder / "large.jsonl"
    write_corpus(small, megabytes / 10, seed=1)
    records = write_corpus(large, megabytes, seed=2)
    size_mb = large.stat().st_size / 1e6
    print(f"corpus file: {size_mb:.1f} MB, {records:,} records (documents with 2 chunks each)")

    rounds = int(os.environ.get("BENCH_INGEST_ROUNDS", "3"))
    _, _, rss_small = ingest(small, "bench small")  # also the warm-up (imports, schema)
    subject_runs: list[tuple] = []

    def subject() -> float:  # records/s
        corpus, seconds, rss = ingest(large, f"bench large {len(subject_runs) + 1}")
        assert corpus.record_count == records, (corpus.record_count, records)
        subject_runs.append((corpus, seconds, rss))
        return records / seconds

    def base() -> float:  # records/s
        count, seconds = baseline(large)
        assert count == records, (count, records)
        return count / seconds

    samples = rotate([("subject", subject), ("baseline", base)], rounds, self_timed=True)
    rate, base_rate = statistics.median(samples["subject"]), statistics.median(samples["baseline"])
    corpus, _, rss = subject_runs[0]
    seconds = records / rate
    metrics = corpus.ingestions.get().metrics
    print(
        f"subject  corpus_create, end to end   {seconds:6.2f} s  {rate:10,.0f} records/s  "
        f"{size_mb / seconds:6.1f} MB/s  ({corpus.chunk_count:,} chunks stored)"
    )
    print(
        f"         of which streaming validation + inserts {metrics['seconds']:.2f} s "
        f"({metrics['records_per_second']:,.0f} records/s, first run); the rest is the commit, "
        "the stored copy and the corpus row"
    )
    print(f"         stored ingestion metrics (first run): {json.dumps(metrics)}")
    base_seconds = records / base_rate
    print(
        f"baseline json + jsonschema, validate only {base_seconds:6.2f} s  "
        f"{base_rate:10,.0f} records/s"
    )
    print(
        f"ratio ingestion/baseline = {rate / base_rate:.1f}x; target 20,000 records/s: "
        + ("met" if rate >= 20_000 else "NOT met")
        + f" (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    )
    print(
        f"         records/s: subject {spread(samples['subject'], ',.0f')}; "
        f"baseline {spread(samples['baseline'], ',.0f')} ({rounds} each, alternating)"
    )
    print(
        f"memory: peak RSS growth {rss_small.growth_mb:.1f} MB for {size_mb / 10:.0f} MB, "
        f"{rss.growth_mb:.1f} MB for {size_mb:.0f} MB "
        f"(file x10, memory x{rss.growth_mb / max(rss_small.growth_mb, 0.1):.2f})"
    )
    for path in (small, large):
        path.unlink()
    folder.rmdir()
