"""Retrieval quality on the sample corpus: 52 questions written from the speeches and the
declaration (tests/corpora/rag_questions.jsonl), each with the chunk(s) that answer it (two
where the answer falls in the overlap of neighbouring chunks). recall@5 and MRR@10 of the
offline MiniLM knowledge base are printed and held above floors set under the measured
figures (when written: dense recall@5 1.000, MRR 0.881; hybrid recall@5 0.981, MRR 0.891)."""

import json
from pathlib import Path

import pytest

from corpora.models import Chunk
from corpora.rag import services as rag
from tests.corpora.test_rag import _offline, sample_corpus, sample_kb  # noqa: F401

pytestmark = pytest.mark.django_db

QUESTIONS = Path(__file__).with_name("rag_questions.jsonl")
RECALL_AT_5_FLOOR = 0.9
MRR_FLOOR = 0.75


def load_questions() -> list[dict]:
    return [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]


def test_the_question_set_is_real_and_points_at_existing_chunks(sample_corpus):  # noqa: F811
    questions = load_questions()
    assert len(questions) >= 50
    assert len({q["question"] for q in questions}) == len(questions)
    chunks = set(Chunk.objects.values_list("document__external_id", "position"))
    for q in questions:
        assert q["chunks"] and all((q["document"], p) in chunks for p in q["chunks"]), q
    # Every chunk of the sample corpus is the answer to at least one question.
    answered = {(q["document"], p) for q in questions for p in q["chunks"]}
    assert answered == chunks


def evaluate(kb, *, hybrid: bool) -> tuple[float, float, list]:
    hits, reciprocal, misses = 0, 0.0, []
    questions = load_questions()
    for q in questions:
        found = rag.rag_retrieve(
            knowledge_base=kb, question=q["question"], k=10, threshold=-1, hybrid=hybrid
        )
        wanted = {(q["document"], p) for p in q["chunks"]}
        ranks = [c.rank for c in found.contexts if (c.document_external_id, c.position) in wanted]
        first = min(ranks) if ranks else None
        if first is not None and first <= 5:
            hits += 1
        else:
            misses.append(q["question"])
        reciprocal += 1.0 / first if first else 0.0
    return hits / len(questions), reciprocal / len(questions), misses


@pytest.mark.parametrize("hybrid", [False, True], ids=["dense", "hybrid"])
def test_recall_at_5_and_mrr_hold_above_the_floor(sample_kb, hybrid):  # noqa: F811
    recall, mrr, misses = evaluate(sample_kb, hybrid=hybrid)
    print(
        f"\nRAG retrieval ({'hybrid' if hybrid else 'dense'}): recall@5={recall:.3f} "
        f"MRR@10={mrr:.3f} over {len(load_questions())} questions; missed: {misses}"
    )
    assert recall >= RECALL_AT_5_FLOOR, misses
    assert mrr >= MRR_FLOOR
