"""The exact-match response cache: Django's cache (Redis in production, the database cache
embedded), keyed by the SHA-256 of the canonical JSON of everything that decides an answer.

Redis down: calls continue uncached (a lookup is a miss, a store is skipped, the answer says
``cached: false``) and a warning is logged at most once a minute per process.
"""

from __future__ import annotations

import hashlib
import logging

import orjson
from django.core.cache import cache

from config.errors import dependency_errors, warn_degraded

logger = logging.getLogger("crucible.gateway")

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
    try:
        return cache.get(PREFIX + key)
    except dependency_errors() as exc:
        warn_degraded(logger, "gateway response cache", exc)
        return None


def lookup_with(key: str, others: list[str]) -> tuple[dict | None, dict | None]:
    """``lookup(key)`` and the values of the cache keys ``others`` (the breaker's state) in one
    round trip: (the hit or None, {other key: value} for those present). (None, None) when the
    cache is unreachable."""
    try:
        found = cache.get_many([PREFIX + key, *others])
    except dependency_errors() as exc:
        warn_degraded(logger, "gateway response cache", exc)
        return None, None
    return found.pop(PREFIX + key, None), found


def store(key: str, *, raw: str, prompt_tokens: int, completion_tokens: int, ttl_s: int) -> None:
    if ttl_s <= 0:
        return
    try:
        cache.set(
            PREFIX + key,
            {"raw": raw, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
            timeout=ttl_s,
        )
    except dependency_errors() as exc:
        warn_degraded(logger, "gateway response cache", exc)
