"""A circuit breaker per provider, its state in Django's cache (Redis in production, the
database cache embedded), so every web and worker process sees the same state.

closed -> (N consecutive transient failures) -> open for ``reset_s`` -> half-open: one probe
call goes through (an atomic ``cache.add`` elects it); its success closes the breaker, its
failure opens it again. Permanent errors (4xx) mean the provider answered: they count as
success for the breaker. pybreaker was considered: its Redis storage does not cover the
database-cache mode, so this small state machine over ``django.core.cache`` is used instead.

Redis down (the state cannot be read or written): the breaker fails open (calls go ahead as if
closed) but keeps counting in this process: after N consecutive transient failures seen here it
opens locally for ``reset_s``, so a dead provider is still not hammered by this process. When
Redis answers again the shared state takes over. A warning is logged once a minute.
"""

from __future__ import annotations

import logging
import time

from django.core.cache import cache

from config.errors import dependency_errors, warn_degraded

PREFIX = "gw:breaker:"
logger = logging.getLogger("crucible.gateway")

# Per-process fallback while the shared state is unreachable: slug -> [failures, open_until].
_local: dict[str, list[float]] = {}


def _unreachable(exc: BaseException) -> None:
    warn_degraded(logger, "gateway breaker state (cache)", exc)


def _keys(slug: str) -> tuple[str, str, str]:
    return f"{PREFIX}{slug}:open_until", f"{PREFIX}{slug}:failures", f"{PREFIX}{slug}:probe"


class Breaker:
    def __init__(self, slug: str, *, threshold: int, reset_s: float):
        self.slug = slug
        self.threshold = max(1, int(threshold))
        self.reset_s = float(reset_s)
        self.k_open, self.k_fail, self.k_probe = _keys(slug)
        self._dirty = False  # this call saw failures recorded (success must clear them)
        self.is_probe = False

    def state_keys(self) -> list[str]:
        """The cache keys ``before_call`` reads (a caller may fetch them with its own keys)."""
        return [self.k_open, self.k_fail]

    def before_call(self, state: dict | None = None) -> float | None:
        """None when the call may go ahead; else the seconds until it may be tried again.
        ``state``: the values of ``state_keys()`` already read from the cache (else read)."""
        if self.is_probe:
            return None  # this call is the half-open probe (its retries included)
        if state is None:
            try:
                state = cache.get_many([self.k_open, self.k_fail])
            except dependency_errors() as exc:
                _unreachable(exc)
                return self._local_before_call()
        open_until = state.get(self.k_open)
        self._dirty = bool(state.get(self.k_fail)) or open_until is not None
        if open_until is None:
            return None
        now = time.time()
        if now < open_until:
            return open_until - now
        # Half-open: exactly one caller probes; the others wait for its outcome.
        try:
            elected = cache.add(self.k_probe, now, timeout=max(1, int(self.reset_s) + 1))
        except dependency_errors() as exc:
            _unreachable(exc)
            return self._local_before_call()
        if elected:
            self.is_probe = True
            return None
        return max(0.5, min(self.reset_s, 5.0))

    def success(self) -> None:
        _local.pop(self.slug, None)
        if self._dirty or self.is_probe:
            try:
                cache.delete_many([self.k_open, self.k_fail, self.k_probe])
            except dependency_errors() as exc:
                _unreachable(exc)
            self._dirty = self.is_probe = False

    def failure(self) -> bool:
        """Count one transient failure; True when this opened the breaker."""
        try:
            return self._shared_failure()
        except dependency_errors() as exc:
            _unreachable(exc)
            return self._local_failure()

    def _local_before_call(self) -> float | None:
        """The per-process state while the shared one is unreachable: closed unless this
        process saw ``threshold`` consecutive failures within the last ``reset_s``."""
        entry = _local.get(self.slug)
        if entry is None or entry[1] <= 0:
            return None
        left = entry[1] - time.time()
        if left > 0:
            return left
        _local.pop(self.slug, None)  # its time passed: let calls (and failures) count again
        return None

    def _local_failure(self) -> bool:
        entry = _local.setdefault(self.slug, [0, 0.0])
        entry[0] += 1
        if entry[0] >= self.threshold:
            entry[0], entry[1] = 0, time.time() + self.reset_s
            self.is_probe = False
            return True
        return False

    def _shared_failure(self) -> bool:
        self._dirty = True
        if self.is_probe:
            self._open()
            return True
        if not cache.add(self.k_fail, 1, timeout=None):
            try:
                failures = cache.incr(self.k_fail)
            except ValueError:  # expired or deleted meanwhile
                cache.set(self.k_fail, 1, timeout=None)
                failures = 1
        else:
            failures = 1
        if failures >= self.threshold:
            self._open()
            return True
        return False

    def _open(self) -> None:
        cache.set(self.k_open, time.time() + self.reset_s, timeout=None)
        cache.delete(self.k_probe)
        self.is_probe = False


def breaker_state(slug: str) -> dict:
    k_open, k_fail, _ = _keys(slug)
    try:
        state = cache.get_many([k_open, k_fail])
    except dependency_errors() as exc:
        _unreachable(exc)
        entry = _local.get(slug) or [0, 0.0]
        left = entry[1] - time.time()
        return {
            "state": "open" if left > 0 else "closed",
            "retry_after_s": round(left, 3) if left > 0 else None,
            "failures": int(entry[0]),
            "detail": "shared state unreachable (cache down): this process's own count",
        }
    open_until = state.get(k_open)
    failures = int(state.get(k_fail) or 0)
    if open_until is None:
        return {"state": "closed", "retry_after_s": None, "failures": failures}
    left = open_until - time.time()
    if left > 0:
        return {"state": "open", "retry_after_s": round(left, 3), "failures": failures}
    return {"state": "half_open", "retry_after_s": None, "failures": failures}


def breaker_reset(slug: str) -> None:
    cache.delete_many(list(_keys(slug)))
