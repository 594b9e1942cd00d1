"""Shared rate limits per provider and per model (requests and tokens per window), held for
every web and worker process with the ``limits`` package's moving window.

Production (REDIS_URL): ``limits``' own RedisStorage. Embedded (no Redis): DatabaseStorage
below, a ``limits`` storage over one table row per counter. ``limits`` ships storages for
memory, Redis, Memcached, MongoDB and etcd but none for SQL, and a memory storage would not
be shared between processes; a row locked for the read-modify-write (SELECT ... FOR UPDATE on
PostgreSQL, SQLite's IMMEDIATE transactions) makes the database the shared counter.

Redis down: each process falls back to its own ``limits`` MemoryStorage with the same limits
(so N processes may together send up to N times a provider's limit while Redis is away; the
provider's own 429s, retried with Retry-After, are the backstop). Calls go on rather than fail;
a warning is logged once a minute. The shared counters take over again when Redis answers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage, MovingWindowSupport, Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter

from config.errors import dependency_errors, warn_degraded
from jobs.models import RateLimitWindow

logger = logging.getLogger("crucible.gateway")


class DatabaseStorage(Storage, MovingWindowSupport):
    """A ``limits`` storage in the database (moving and fixed windows)."""

    STORAGE_SCHEME = ["crucible-db"]
    DEPENDENCIES: list[str] = []

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options):
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)

    @property
    def base_exceptions(self):
        return DatabaseError

    def _locked(self, key: str) -> RateLimitWindow:
        try:
            with transaction.atomic():
                RateLimitWindow.objects.get_or_create(key=key)
        except IntegrityError:
            pass  # another process created it
        return RateLimitWindow.objects.select_for_update().get(key=key)

    # Moving window --------------------------------------------------------------------------

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        now = time.time()
        with transaction.atomic():
            row = self._locked(key)
            live = [e for e in row.entries if e[0] > now - expiry]
            if sum(e[1] for e in live) + amount > limit:
                if len(live) != len(row.entries):
                    RateLimitWindow.objects.filter(pk=row.pk).update(entries=live)
                return False
            live.append([now, amount])
            RateLimitWindow.objects.filter(pk=row.pk).update(entries=live)
            return True

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        now = time.time()
        row = RateLimitWindow.objects.filter(key=key).only("entries").first()
        live = [e for e in (row.entries if row else []) if e[0] > now - expiry]
        if not live:
            return now, 0
        return min(e[0] for e in live), sum(e[1] for e in live)

    # Fixed window (the base interface) -------------------------------------------------------

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = time.time()
        with transaction.atomic():
            row = self._locked(key)
            if row.expires_at <= now:
                row.count, row.expires_at = 0, now + expiry
            row.count += amount
            row.save(update_fields=["count", "expires_at"])
            return row.count

    def get(self, key: str) -> int:
        row = RateLimitWindow.objects.filter(key=key).first()
        return row.count if row and row.expires_at > time.time() else 0

    def get_expiry(self, key: str) -> float:
        row = RateLimitWindow.objects.filter(key=key).first()
        return row.expires_at if row and row.expires_at > time.time() else time.time()

    def check(self) -> bool:
        try:
            RateLimitWindow.objects.exists()
        except DatabaseError:
            return False
        return True

    def reset(self) -> int | None:
        deleted, _ = RateLimitWindow.objects.all().delete()
        return deleted

    def clear(self, key: str) -> None:
        RateLimitWindow.objects.filter(key=key).delete()


_limiter: tuple[str, MovingWindowRateLimiter] | None = None
_fallback: MovingWindowRateLimiter | None = None


def fallback_limiter() -> MovingWindowRateLimiter:
    """This process's own limiter, used while the shared store (Redis) is unreachable."""
    global _fallback
    if _fallback is None:
        _fallback = MovingWindowRateLimiter(MemoryStorage())
    return _fallback


def limiter() -> MovingWindowRateLimiter:
    global _limiter
    uri = settings.REDIS_URL or "crucible-db://"
    if _limiter is None or _limiter[0] != uri:
        storage = storage_from_string(uri) if settings.REDIS_URL else DatabaseStorage()
        _limiter = (uri, MovingWindowRateLimiter(storage))
    return _limiter[1]


@dataclass(frozen=True)
class Limit:
    scope: str  # "gw:<provider slug>" or "gw:<model key>"
    what: str  # "requests" or "tokens"
    amount: int
    window_s: int

    def item(self) -> RateLimitItemPerSecond:
        return RateLimitItemPerSecond(self.amount, held_s(self.window_s))


def held_s(window_s: int) -> int:
    """How long a taken slot counts: the window plus a margin of 1 s per 30 s of window.

    A provider counts requests as they arrive; the limiter counts them as they take a slot,
    and a request can reach the provider a while after that (a cold connection, a busy
    process). Without the margin, requests that took the first window's slots and arrived
    late land in the provider's window together with the next window's first requests:
    bench_batch saw 392 arrivals in one 60-s window at a limit of 360 (32 = 4 worker
    processes x 8 threads taking slots at once, then opening their connections). With it, the
    sustained rate is amount / (window + margin): 96.8% of a per-minute limit."""
    return window_s + window_s // 30


def limits_for(provider, model) -> list[Limit]:
    """The provider's limits, and the model's own where it sets them (both must allow)."""
    window = max(1, int(settings.GATEWAY_RATE_WINDOW_S))
    found = []
    if provider.requests_per_minute:
        found.append(Limit(f"p:{provider.slug}", "requests", provider.requests_per_minute, window))
    if provider.tokens_per_minute:
        found.append(Limit(f"p:{provider.slug}", "tokens", provider.tokens_per_minute, window))
    if model.requests_per_minute:
        found.append(Limit(f"m:{model.key}", "requests", model.requests_per_minute, window))
    if model.tokens_per_minute:
        found.append(Limit(f"m:{model.key}", "tokens", model.tokens_per_minute, window))
    return found


def try_acquire(limits: list[Limit], *, tokens: int) -> float | None:
    """Take one request and ``tokens`` from every limit; None when taken, else the seconds
    until the first refusing limit may have room. Limits taken before a refusal stay taken
    (a wasted slot errs on the safe side of the provider's limit)."""
    if not limits:
        return None
    try:
        return _acquire(limiter(), limits, tokens=tokens)
    except dependency_errors() as exc:
        warn_degraded(logger, "gateway shared rate limits (Redis)", exc)
        return _acquire(fallback_limiter(), limits, tokens=tokens)


def _acquire(lim: MovingWindowRateLimiter, limits: list[Limit], *, tokens: int) -> float | None:
    for limit in limits:
        cost = 1 if limit.what == "requests" else min(max(1, tokens), limit.amount)
        item = limit.item()
        if not lim.hit(item, "gateway", limit.scope, limit.what, cost=cost):
            stats = lim.get_window_stats(item, "gateway", limit.scope, limit.what)
            return max(0.05, stats.reset_time - time.time())
    return None
