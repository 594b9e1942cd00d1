"""RAG routes: knowledge bases and queries, mounted at /api/v1/rag/ and /v1/rag/.

A django-ninja Router belongs to one API, so ``build_router()`` makes one per API:
``router`` (for config/api.py's /api/v1/) and ``public_router`` (for the /v1/ API).
Reads need a dashboard role; creating, updating, deleting and querying (which spends the
model budget) need ``core.run_jobs``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from uuid import UUID

from django.http import HttpRequest
from ninja import Field, Router, Schema
from ninja.responses import Status
from pydantic import StringConstraints

from config.api_routes import ERRORS, ErrorOut
from config.auth import requires
from config.errors import NotFound
from corpora.models import KnowledgeBase
from corpora.rag import services

# An equality filter on metadata: non-empty keys, scalar values (rag.services._check_filter).
MetadataFilter = dict[Annotated[str, StringConstraints(min_length=1)], str | int | float | bool]


class IndexIn(Schema):
    name: str = Field(
        ..., max_length=200, pattern=r"\S", description="A name for the knowledge base"
    )
    corpora: list[UUID] = Field(..., min_length=1, description="Corpus ids whose chunks it covers")
    filter: MetadataFilter = Field(
        default_factory=dict,
        description="Equality filter on chunk or document metadata, e.g. {'topic': 'space'}",
    )
    embedding_model: str = Field(
        services.DEFAULT_EMBEDDING_MODEL, description="A registry embedding model key"
    )
    description: str = ""


class IndexOut(Schema):
    id: UUID
    name: str
    description: str
    status: str
    progress: float
    progress_message: str
    error: str
    corpora: list[dict]
    filter: dict
    embedding_model: str
    dimensions: int
    version: int
    chunk_count: int
    document_count: int
    tombstone_count: int
    size_bytes: int
    checksum: str
    search: str = Field(description="exact (numpy) or approximate (usearch HNSW)")
    recall_at_10: float | None = Field(
        None, description="Approximate index against exact search, measured at build"
    )
    last_build: dict
    created_at: datetime
    built_at: datetime | None
    refreshed_at: datetime | None

    @staticmethod
    def resolve_corpora(obj: KnowledgeBase) -> list[dict]:
        return [{"id": str(c.pk), "name": c.name} for c in obj.corpora.all()]

    @staticmethod
    def resolve_filter(obj: KnowledgeBase) -> dict:
        return obj.chunk_filter or {}

    @staticmethod
    def resolve_search(obj: KnowledgeBase) -> str:
        return "approximate" if obj.is_approximate else "exact"


class QueryIn(Schema):
    index: UUID = Field(..., description="Knowledge base id")
    question: str = Field(..., max_length=4000, pattern=r"\S")
    k: int = Field(services.DEFAULT_K, ge=1, le=services.MAX_K)
    threshold: float = Field(
        services.DEFAULT_THRESHOLD, ge=-1, le=1, description="Minimum cosine score of a context"
    )
    model: str = Field(services.DEFAULT_CHAT_MODEL, description="Chat model for the answer")
    profile: str | None = Field(None, description="Response profile ('name' or 'name@vN')")
    filters: MetadataFilter = Field(default_factory=dict, description="Equality filter on metadata")
    hybrid: bool = Field(False, description="Fuse BM25 with the vector ranking (RRF)")


class ContextOut(Schema):
    rank: int
    score: float
    chunk_id: int
    document_id: int
    document_external_id: str
    document_title: str
    corpus_id: str
    position: int
    start_char: int | None
    end_char: int | None
    text: str
    lexical_rank: int | None = None
    source: int | None = Field(None, description="The [n] the answer cites it by")
    cited: bool = False


class QueryOut(Schema):
    knowledge_base: str
    index_version: int
    question: str
    no_context: bool
    answer: str
    message: str
    best_score: float | None
    threshold: float
    retrieval_mode: str
    contexts: list[ContextOut]
    citations: list[dict]
    invalid_citations: list[int]
    sentences: list[dict]
    grounded: bool
    faithfulness: float
    flags: list[str]
    model: str | None
    profile: str | None
    usage: dict | None
    timings: dict


def _kb(index_id: UUID) -> KnowledgeBase:
    kb = KnowledgeBase.objects.for_list().filter(pk=index_id).first()
    if kb is None:
        raise NotFound(f"No knowledge base {index_id}.", details={"id": str(index_id)})
    return kb


def _user(request: HttpRequest):
    return getattr(request, "auth", None) or request.user


# The answer comes from a model through the gateway: its provider may fail, be unavailable or
# time out (jobs/gateway/errors.py).
MODEL_ERRORS = {502: ErrorOut, 503: ErrorOut, 504: ErrorOut}


def build_router() -> Router:
    router = Router(tags=["rag"])

    @router.post(
        "/rag/indexes",
        response={202: IndexOut, **ERRORS},
        auth=requires("run_jobs"),
        summary="Create a knowledge base from corpora (it builds in the background)",
    )
    def create_index(request: HttpRequest, payload: IndexIn):
        kb = services.knowledge_base_create(
            name=payload.name,
            corpus_ids=payload.corpora,
            user=_user(request),
            embedding_model=payload.embedding_model,
            chunk_filter=payload.filter,
            description=payload.description,
        )
        return Status(202, _kb(kb.pk))

    @router.get(
        "/rag/indexes",
        response={200: list[IndexOut], **ERRORS},
        auth=requires("view_dashboard"),
        summary="Knowledge bases and their status",
    )
    def list_indexes(request: HttpRequest):
        return list(KnowledgeBase.objects.for_list())

    @router.get(
        "/rag/indexes/{index_id}",
        response={200: IndexOut, **ERRORS},
        auth=requires("view_dashboard"),
        summary="One knowledge base: status, counts, size, checksum, recall@10",
    )
    def get_index(request: HttpRequest, index_id: UUID):
        return _kb(index_id)

    @router.post(
        "/rag/indexes/{index_id}/update",
        response={202: IndexOut, **ERRORS},
        auth=requires("run_jobs"),
        summary="Update: embed new and changed chunks, drop removed ones",
    )
    def update_index(request: HttpRequest, index_id: UUID):
        services.knowledge_base_request_update(knowledge_base=_kb(index_id))
        return Status(202, _kb(index_id))

    @router.delete(
        "/rag/indexes/{index_id}",
        response={204: None, **ERRORS},
        auth=requires("run_jobs"),
        summary="Delete a knowledge base and its stored vectors",
    )
    def delete_index(request: HttpRequest, index_id: UUID):
        services.knowledge_base_delete(knowledge_base=_kb(index_id))
        return Status(204, None)

    @router.post(
        "/rag/query",
        response={200: QueryOut, **ERRORS, **MODEL_ERRORS},
        auth=requires("run_jobs"),
        summary="Retrieve contexts and answer with checked citations",
    )
    def query(request: HttpRequest, payload: QueryIn):
        return services.rag_query(
            knowledge_base=_kb(payload.index),
            question=payload.question,
            k=payload.k,
            threshold=payload.threshold,
            model=payload.model,
            profile=payload.profile,
            filters=payload.filters,
            hybrid=payload.hybrid,
            user=_user(request),
        )

    return router


router = build_router()
public_router = build_router()
