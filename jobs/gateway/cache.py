"""The exact-match response cache: Django's cache (Redis in production, the database cache
embedded), keyed by the SHA-256 of the canonical JSON of everything that decides an answer.
"""

from __future__ import annotations

import hashlib

import orjson
from django.core.cache import cache

PREFIX = "gw:resp:"
MODES = ("default", "no-store", "refresh")


def cache_key(
    *,
    provider: str,
    remote_id: str,
    revision: str,
    operation: str,
    body: dict,
    run_index: int | None,
) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace) of the provider, the remote
    model id, the model revision (an adapter's checksum: a new adapter is a new key), the
    operation and the whole request body, with the caller's run index."""
    canonical = orjson.dumps(
        {
            "provider": provider,
            "model": remote_id,
            "revision": revision or "",
            "operation": operation,
            "body": body,
            "run_index": run_index,
        },
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).hexdigest()


def lookup(key: str) -> dict | None:
    """{"raw": the stored response JSON (bytes as first returned), "prompt_tokens",
    "completion_tokens"} or None."""
    return cache.get(PREFIX + key)


def store(key: str, *, raw: str, prompt_tokens: int, completion_tokens: int, ttl_s: int) -> None:
    if ttl_s <= 0:
        return
    cache.set(
        PREFIX + key,
        {"raw": raw, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        timeout=ttl_s,
    )
