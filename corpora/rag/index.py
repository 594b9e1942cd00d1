"""Vector storage and search of knowledge bases.

A knowledge base's vectors are stored through config/storage.py, one pair of ``.npy`` files
per segment (normalised float32 vectors, int64 chunk ids). Its ``manifest`` (a JSON column,
switched with ``version`` in one UPDATE) names the visible segments, the rows of each that are
tombstoned, and the approximate index if there is one::

    {"segments": [{"number": 1, "vectors": "...npy", "ids": "...npy", "count": 15,
                   "bytes": 23168, "tombstones": [3]}],
     "next_segment": 2, "dims": 384,
     "ann": {"path": "...usearch", "bytes": ..., "recall_at_10": 0.99} | null}

Search is exact cosine top-k over numpy (a matrix-vector product and argpartition) below
``ANN_THRESHOLD`` visible vectors, and a usearch HNSW index above it (usearch: maintained,
wheels for every platform; hnswlib has none). BM25 (bm25s) over the chunk texts can be fused
with the dense ranking by reciprocal rank, per query.

Loaded indexes are kept in a small per-process LRU keyed by (knowledge base, version): a query
reads the row first, so a newer version is always a miss and is loaded fresh.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from config.storage import storage_delete, storage_exists, storage_read, storage_save

# Above this many visible vectors a build adds an approximate (usearch) index.
ANN_THRESHOLD = int(os.environ.get("RAG_ANN_THRESHOLD", "20000"))
# HNSW parameters: connectivity (M), expansion at build and at search (ef).
ANN_CONNECTIVITY = 16
ANN_EXPANSION_ADD = 128
ANN_EXPANSION_SEARCH = int(os.environ.get("RAG_ANN_EXPANSION_SEARCH", "64"))
# Loaded indexes kept per process.
CACHE_ENTRIES = int(os.environ.get("RAG_CACHE_ENTRIES", "4"))
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al., 2009)


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return vectors / norms


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npy_load(path: str) -> np.ndarray:
    return np.load(io.BytesIO(storage_read(path)), allow_pickle=False)


def segment_prefix(kb_id) -> str:
    return f"rag/{kb_id}"


def write_segment(kb_id, number: int, vectors: np.ndarray, chunk_ids: np.ndarray) -> dict:
    """Store one segment (normalised vectors + chunk ids); returns its manifest entry."""
    vectors = normalise(vectors)
    ids = np.asarray(chunk_ids, dtype=np.int64)
    if len(vectors) != len(ids):
        raise ValueError("a segment needs one chunk id per vector")
    vec_bytes, id_bytes = _npy_bytes(vectors), _npy_bytes(ids)
    prefix = segment_prefix(kb_id)
    vec_path = storage_save(f"{prefix}/segment-{number:06d}.vectors.npy", io.BytesIO(vec_bytes))
    ids_path = storage_save(f"{prefix}/segment-{number:06d}.ids.npy", io.BytesIO(id_bytes))
    return {
        "number": number,
        "vectors": vec_path,
        "ids": ids_path,
        "count": len(ids),
        "bytes": len(vec_bytes) + len(id_bytes),
        "tombstones": [],
    }


def read_segment(segment: dict) -> tuple[np.ndarray, np.ndarray]:
    return _npy_load(segment["vectors"]), _npy_load(segment["ids"])


def visible_arrays(manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    """All visible (not tombstoned) vectors and their chunk ids, in manifest order."""
    dims = int(manifest.get("dims") or 0)
    parts, id_parts = [], []
    for segment in manifest.get("segments") or []:
        vectors, ids = read_segment(segment)
        if segment.get("tombstones"):
            keep = np.ones(len(ids), dtype=bool)
            keep[np.asarray(segment["tombstones"], dtype=np.int64)] = False
            vectors, ids = vectors[keep], ids[keep]
        parts.append(vectors)
        id_parts.append(ids)
    if not parts:
        return np.zeros((0, dims), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return np.ascontiguousarray(np.vstack(parts)), np.concatenate(id_parts)


def delete_files(paths: list[str]) -> None:
    for path in paths:
        if path and storage_exists(path):
            storage_delete(path)


def manifest_paths(manifest: dict) -> list[str]:
    paths = []
    for segment in manifest.get("segments") or []:
        paths += [segment["vectors"], segment["ids"]]
    if manifest.get("ann"):
        paths.append(manifest["ann"]["path"])
    return paths


# --- Search ---------------------------------------------------------------------------------


def exact_top_k(
    vectors: np.ndarray, query: np.ndarray, k: int, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Positions and cosine scores of the ``k`` best rows (vectors and query normalised)."""
    if len(vectors) == 0 or k <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    scores = vectors @ query.astype(np.float32)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    keep = np.isfinite(scores[top])
    return top[keep], scores[top][keep]


def build_ann(vectors: np.ndarray):
    from usearch.index import Index

    index = Index(
        ndim=vectors.shape[1],
        metric="cos",
        dtype="f32",
        connectivity=ANN_CONNECTIVITY,
        expansion_add=ANN_EXPANSION_ADD,
        expansion_search=ANN_EXPANSION_SEARCH,
    )
    index.add(np.arange(len(vectors), dtype=np.uint64), vectors, threads=0)
    return index


def ann_top_k(index, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    matches = index.search(query.astype(np.float32), k)
    keys = np.asarray(matches.keys, dtype=np.int64)
    distances = np.asarray(matches.distances, dtype=np.float32)
    keep = keys >= 0
    return keys[keep], 1.0 - distances[keep]


def measure_recall(
    index, vectors: np.ndarray, *, queries: int = 200, k: int = 10, seed: int = 0
) -> float:
    """recall@k of the approximate index against exact search, on query vectors drawn near
    stored ones (a stored vector plus noise, renormalised)."""
    rng = np.random.default_rng(seed)
    n = len(vectors)
    picks = rng.choice(n, size=min(queries, n), replace=False)
    noisy = normalise(vectors[picks] + rng.normal(0, 0.05, size=vectors[picks].shape))
    hits = 0
    for query in noisy:
        exact, _ = exact_top_k(vectors, query, k)
        approx, _ = ann_top_k(index, query, k)
        hits += len(set(exact.tolist()) & set(approx.tolist()))
    return hits / (len(picks) * min(k, n))


def save_ann(kb_id, version: int, index) -> dict:
    data = bytes(index.save())
    path = storage_save(f"{segment_prefix(kb_id)}/ann-v{version:06d}.usearch", io.BytesIO(data))
    return {"path": path, "bytes": len(data)}


def load_ann(path: str):
    from usearch.index import Index

    index = Index.restore(bytearray(storage_read(path)))
    index.expansion_search = ANN_EXPANSION_SEARCH
    return index


@dataclass
class LoadedIndex:
    key: tuple
    vectors: np.ndarray
    chunk_ids: np.ndarray
    ann: object | None = None
    _bm25: object | None = None
    _bm25_lock: threading.Lock = field(default_factory=threading.Lock)

    def __len__(self) -> int:
        return len(self.chunk_ids)

    def positions_of(self, chunk_ids) -> np.ndarray:
        return np.flatnonzero(np.isin(self.chunk_ids, np.asarray(list(chunk_ids), dtype=np.int64)))

    def dense(
        self, query: np.ndarray, k: int, mask: np.ndarray | None = None
    ) -> list[tuple[int, float]]:
        """(position, cosine) of the k nearest rows: the approximate index when there is one
        and no mask, exact numpy otherwise."""
        if self.ann is not None and mask is None:
            positions, scores = ann_top_k(self.ann, query, k)
        else:
            positions, scores = exact_top_k(self.vectors, query, k, mask)
        return [(int(p), float(s)) for p, s in zip(positions, scores, strict=True)]

    def bm25(self, texts_of) -> object:
        """The BM25 retriever over this version's chunk texts, built once per loaded version;
        ``texts_of(chunk_ids)`` returns {chunk id: text}."""
        with self._bm25_lock:
            if self._bm25 is None:
                import bm25s

                texts = texts_of(self.chunk_ids.tolist())
                corpus = [texts.get(int(cid), "") for cid in self.chunk_ids]
                retriever = bm25s.BM25()
                retriever.index(
                    bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False
                )
                self._bm25 = retriever
            return self._bm25

    def lexical(self, question: str, k: int, texts_of, mask=None) -> list[tuple[int, float]]:
        import bm25s

        if len(self) == 0:
            return []
        retriever = self.bm25(texts_of)
        tokens = bm25s.tokenize([question], stopwords="en", show_progress=False)
        if not tokens.vocab:
            return []
        n = min(len(self), max(k, 1) * (4 if mask is not None else 1))
        docs, scores = retriever.retrieve(tokens, k=n, show_progress=False)
        out = []
        for position, score in zip(docs[0], scores[0], strict=True):
            if score <= 0 or (mask is not None and not mask[int(position)]):
                continue
            out.append((int(position), float(score)))
        return out[:k]


def rrf(rankings: list[list[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: score(d) = sum over rankings of 1 / (k + rank(d))."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, position in enumerate(ranking, start=1):
            fused[position] = fused.get(position, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda item: -item[1])


class _LRU:
    def __init__(self, size: int):
        self.size = size
        self.items: OrderedDict[tuple, LoadedIndex] = OrderedDict()
        self.lock = threading.Lock()
        self.loads = 0

    def get(self, kb_id, version: int, manifest: dict) -> LoadedIndex:
        key = (str(kb_id), int(version))
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        vectors, ids = visible_arrays(manifest)
        ann = load_ann(manifest["ann"]["path"]) if manifest.get("ann") else None
        loaded = LoadedIndex(key=key, vectors=vectors, chunk_ids=ids, ann=ann)
        with self.lock:
            self.loads += 1
            # Older versions of the same knowledge base are never used again.
            for old in [k for k in self.items if k[0] == key[0] and k[1] != key[1]]:
                del self.items[old]
            self.items[key] = loaded
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return loaded

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.loads = 0

    def drop(self, kb_id) -> None:
        with self.lock:
            for old in [k for k in self.items if k[0] == str(kb_id)]:
                del self.items[old]


cache = _LRU(CACHE_ENTRIES)
