"""RAG: knowledge bases over corpus chunks, their vector indexes, and cited answers.

    corpora.rag.index     segments in storage, exact (numpy) and approximate (usearch) search,
                          BM25 (bm25s) with reciprocal-rank fusion, the per-process LRU
    corpora.rag.services  knowledge_base_* workflows (create, build/update, delete, add texts)
                          and rag_* (retrieve, answer, query)
    corpora.rag.grounding citations [n] checked, per-sentence support, grounded/faithfulness

Dependency direction: corpora.rag imports jobs.gateway (embeddings and answers go through
the gateway); nothing under jobs imports corpora.rag at module level.
"""
