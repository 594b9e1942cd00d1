"""The RAG explorer page (/datasets/rag/): pick a knowledge base and ask; manage knowledge
bases (create from corpora, build progress, update, delete).

Asking is two htmx requests, so the page can show the two states apart: ``rag_retrieve``
(retrieval in progress → the contexts, or the no-context answer) and, only when a context
passed the threshold, ``rag_generate`` (generation in progress → the cited answer with its
evidence panel). The second request carries the retrieved chunk ids and scores and reads the
chunks again; it calls the same services as POST /v1/rag/query.
"""

from __future__ import annotations

import json
import re

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_POST

from config import llm
from config.errors import CrucibleError
from config.views import dashboard_view
from corpora.models import Corpus, KnowledgeBase
from corpora.rag import services

LIVE_REFRESH_S = 2
_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


def _can_write(request: HttpRequest) -> bool:
    return request.user.has_perm("core.run_jobs")


def _forbidden(request: HttpRequest) -> HttpResponse:
    return render(request, "403.html", status=403)


def _context(request: HttpRequest, **extra) -> dict:
    kbs = list(KnowledgeBase.objects.for_list())
    return {
        "section": "datasets",
        "knowledge_bases": kbs,
        "working": any(kb.is_working for kb in kbs),
        "queryable": [kb for kb in kbs if kb.is_queryable],
        "corpora": Corpus.objects.ready().order_by("name").only("id", "name", "chunk_count"),
        "embedding_models": llm.model_keys(capability="embeddings"),
        "chat_models": llm.model_keys(capability="chat"),
        "defaults": {
            "k": services.DEFAULT_K,
            "threshold": services.DEFAULT_THRESHOLD,
            "embedding_model": services.DEFAULT_EMBEDDING_MODEL,
            "chat_model": services.DEFAULT_CHAT_MODEL,
        },
        "can_write": _can_write(request),
        "refresh": LIVE_REFRESH_S,
        **extra,
    }


@dashboard_view
def rag_explorer(request: HttpRequest) -> HttpResponse:
    context = _context(request, selected=request.GET.get("kb", ""))
    if request.htmx and request.GET.get("part") == "indexes":
        return render(request, "rag/explorer.html#indexes", context)
    return render(request, "rag/explorer.html", context)


def _index_response(request: HttpRequest, *, error: str = "", notice: str = "") -> HttpResponse:
    context = _context(request, index_error=error, index_notice=notice)
    if request.htmx:
        return render(request, "rag/explorer.html#indexes", context)
    return render(request, "rag/explorer.html", context, status=422 if error else 200)


@dashboard_view
@require_POST
def rag_index_create(request: HttpRequest) -> HttpResponse:
    if not _can_write(request):
        return _forbidden(request)
    chunk_filter = {}
    raw = (request.POST.get("filter") or "").strip()
    if raw:
        key, sep, value = raw.partition("=")
        if not sep or not key.strip():
            return _index_response(
                request, error="Write the filter as key=value, e.g. topic=space."
            )
        chunk_filter = {key.strip(): value.strip()}
    try:
        kb = services.knowledge_base_create(
            name=request.POST.get("name", ""),
            corpus_ids=request.POST.getlist("corpora"),
            user=request.user,
            embedding_model=request.POST.get("embedding_model") or services.DEFAULT_EMBEDDING_MODEL,
            chunk_filter=chunk_filter,
        )
    except CrucibleError as exc:
        return _index_response(request, error=exc.message)
    return _index_response(request, notice=f"'{kb.name}' is building.")


def _kb_or_404(pk) -> KnowledgeBase | None:
    return KnowledgeBase.objects.filter(pk=pk).first()


@dashboard_view
@require_POST
def rag_index_update(request: HttpRequest, pk) -> HttpResponse:
    if not _can_write(request):
        return _forbidden(request)
    kb = _kb_or_404(pk)
    if kb is None:
        return _index_response(request, error="That knowledge base no longer exists.")
    try:
        services.knowledge_base_request_update(knowledge_base=kb)
    except CrucibleError as exc:
        return _index_response(request, error=exc.message)
    return _index_response(request, notice=f"'{kb.name}' is updating.")


@dashboard_view
@require_POST
def rag_index_delete(request: HttpRequest, pk) -> HttpResponse:
    if not _can_write(request):
        return _forbidden(request)
    kb = _kb_or_404(pk)
    if kb is None:
        return _index_response(request, error="That knowledge base no longer exists.")
    services.knowledge_base_delete(knowledge_base=kb)
    return _index_response(request, notice=f"'{kb.name}' was deleted.")


def _query_params(request: HttpRequest) -> dict:
    try:
        k = int(request.POST.get("k") or services.DEFAULT_K)
        threshold = float(request.POST.get("threshold") or services.DEFAULT_THRESHOLD)
    except ValueError:
        raise CrucibleError("k is a whole number and the threshold a number.") from None
    return {
        "question": request.POST.get("question", ""),
        "k": k,
        "threshold": threshold,
        "hybrid": request.POST.get("hybrid") == "on",
    }


@dashboard_view
@require_POST
def rag_retrieve(request: HttpRequest) -> HttpResponse:
    if not _can_write(request):
        return _forbidden(request)
    kb = _kb_or_404(request.POST.get("kb") or "00000000-0000-0000-0000-000000000000")
    if kb is None:
        return render(request, "rag/explorer.html#ask_error", {"error": "Pick a knowledge base."})
    try:
        retrieval = services.rag_retrieve(
            knowledge_base=kb, user=request.user, **_query_params(request)
        )
    except CrucibleError as exc:
        return render(request, "rag/explorer.html#ask_error", {"error": exc.message})
    relevant = retrieval.relevant
    return render(
        request,
        "rag/explorer.html#retrieved",
        {
            "retrieval": retrieval,
            "relevant": relevant,
            "no_context": not relevant,
            "no_context_text": services.NO_CONTEXT,
            "chunks_json": json.dumps([[c.chunk_id, c.score] for c in relevant]),
            "model": request.POST.get("model") or services.DEFAULT_CHAT_MODEL,
        },
    )


def _answer_parts(answer: str) -> list[tuple[str, list[int]]]:
    """The answer split into text and citation groups, for links to the evidence panel."""
    parts, last = [], 0
    for match in _CITATION.finditer(answer):
        parts.append((answer[last : match.start()], []))
        parts.append(("", [int(n) for n in match.group(1).split(",")]))
        last = match.end()
    parts.append((answer[last:], []))
    return [p for p in parts if p[0] or p[1]]


@dashboard_view
@require_POST
def rag_generate(request: HttpRequest) -> HttpResponse:
    if not _can_write(request):
        return _forbidden(request)
    kb = _kb_or_404(request.POST.get("kb") or "00000000-0000-0000-0000-000000000000")
    if kb is None:
        return render(request, "rag/explorer.html#ask_error", {"error": "Pick a knowledge base."})
    try:
        chunks = [(int(c), float(s)) for c, s in json.loads(request.POST.get("chunks") or "[]")]
        retrieval = services.retrieval_from_chunks(
            knowledge_base=kb,
            question=request.POST.get("question", ""),
            chunk_scores=chunks,
            threshold=float(request.POST.get("threshold") or services.DEFAULT_THRESHOLD),
            mode=request.POST.get("mode", "exact")[:16],
            retrieval_ms=float(request.POST.get("retrieval_ms") or 0),
        )
        out = services.rag_answer(
            retrieval=retrieval, model=request.POST.get("model") or "", user=request.user
        )
    except (ValueError, TypeError):
        return render(request, "rag/explorer.html#ask_error", {"error": "The retrieval was lost."})
    except CrucibleError as exc:
        return render(request, "rag/explorer.html#ask_error", {"error": exc.message})
    sources = {c.get("source"): c for c in out["contexts"]}
    return render(
        request,
        "rag/explorer.html#answer",
        {"out": out, "parts": _answer_parts(out["answer"]), "sources": sources, "kb": kb},
    )
