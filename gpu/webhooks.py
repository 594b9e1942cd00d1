"""Signed webhooks to the platform (PROTOCOL.md §4).

Every event gets a UUID, a per-process sequence number and a creation time, and is serialised
once; the same body is re-signed and re-sent on each attempt. A background sender delivers
events strictly in order: connection errors, timeouts, 408/429 and 5xx are retried with
exponential backoff and full jitter (a Retry-After header wins when it asks for longer);
other 4xx answers are permanent and the event is dropped with a log line. While an event
is undelivered it stays, with everything after it, in ``events.spool.jsonl`` (one body a
line, in order), which is rewritten as events are delivered and removed once empty; a later
worker started on the same spool sends its events first.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import hmac
import json
import logging
import os
import random
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gpu import WORKER_VERSION

log = logging.getLogger("crucible.worker.webhooks")

RETRYABLE_STATUS = {408, 425, 429}

# Log markers the platform's local executor reads to tell "alive but unheard" from a crash
# (training/executors/local.py): keep them stable.
UNREACHABLE_MARK = "platform unreachable"
REACHABLE_AGAIN_MARK = "platform reachable again"
REJECTED_MARK = "webhook rejected an event with HTTP"


def sign(secret: str, timestamp: str | int, body: bytes | str) -> str:
    """``sha256=`` + hex HMAC-SHA256 of ``f"{timestamp}.{body}"`` with the job's secret."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    message = f"{timestamp}.".encode() + body
    return "sha256=" + hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str, max_age: float = 300) -> bool:
    """What the platform does: the signature matches and the timestamp is fresh."""
    try:
        age = abs(time.time() - int(timestamp))
    except (TypeError, ValueError):
        return False
    return age <= max_age and hmac.compare_digest(sign(secret, timestamp, body), signature or "")


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


class EventEmitter:
    """Base: builds events (id, sequence, created_at). Subclasses decide where they go."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self._lock = threading.Condition()
        self._sequence = 0
        self.listeners: list[Callable[[dict], None]] = []

    def _build(self, type_: str, data: dict[str, Any]) -> tuple[dict, str]:
        self._sequence += 1
        event = {
            "event_id": str(uuid.uuid4()),
            "job_id": self.job_id,
            "type": type_,
            "sequence": self._sequence,
            "created_at": _now_iso(),
            "data": data,
        }
        return event, json.dumps(event, separators=(",", ":"), default=str, allow_nan=False)

    def emit(self, type_: str, data: dict[str, Any]) -> dict:
        data = _finite(data)
        with self._lock:
            event, body = self._build(type_, data)
            self._enqueue(event, body)
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # a listener must never break the worker
                log.exception("event listener failed")
        return event

    def _enqueue(self, event: dict, body: str) -> None:
        raise NotImplementedError

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def close(self, timeout: float | None = None) -> bool:
        return True

    @property
    def pending_count(self) -> int:
        return 0


def _finite(value):
    """JSON has no NaN/inf: send them as null."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class StdoutEmitter(EventEmitter):
    """webhook.url is null: every event is one JSON line on stdout (handy for manual runs)."""

    def __init__(self, job_id: str, stream=None):
        super().__init__(job_id)
        self.stream = stream or sys.stdout

    def _enqueue(self, event, body):
        self.stream.write(body + "\n")
        self.stream.flush()


class WebhookEmitter(EventEmitter):
    def __init__(
        self,
        job_id: str,
        url: str,
        secret: str,
        spool_path: str | os.PathLike | None = None,
        *,
        timeout: float = 10.0,
        max_attempts: int = 6,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        retry_after_cap: float = 300.0,
        idle_retry: float = 30.0,
        start: bool = True,
    ):
        super().__init__(job_id)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook url must be http(s): {url!r}")
        self.url, self.secret = url, secret
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.retry_after_cap = retry_after_cap
        self.idle_retry = idle_retry
        self.spool_path = Path(spool_path) if spool_path else None
        self._pending: deque[str] = deque()
        self._stopping = threading.Event()
        self.delivered = 0
        self.rejected: list[tuple[str, int]] = []
        self.platform_down = False
        self.last_failure = ""
        self._load_spool()
        self._thread = threading.Thread(target=self._run, name="crucible-webhooks", daemon=True)
        if start:
            self._thread.start()

    # ------------------------------------------------------------ spool
    def _load_spool(self) -> None:
        if not self.spool_path or not self.spool_path.is_file():
            return
        for line in self.spool_path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                log.warning("dropping an unreadable line of %s", self.spool_path)
                continue
            self._pending.append(line)
            if event.get("job_id") == self.job_id:
                self._sequence = max(self._sequence, int(event.get("sequence") or 0))
        if self._pending:
            log.info("%d spooled event(s) from an earlier run go out first", len(self._pending))

    def _append_spool(self, body: str) -> None:
        if self.spool_path:
            self.spool_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.spool_path, "a", encoding="utf-8") as handle:
                handle.write(body + "\n")
                handle.flush()

    def _rewrite_spool(self) -> None:
        if not self.spool_path:
            return
        if not self._pending:
            self.spool_path.unlink(missing_ok=True)
            return
        tmp = self.spool_path.with_name(self.spool_path.name + ".tmp")
        tmp.write_text("".join(body + "\n" for body in self._pending), encoding="utf-8")
        os.replace(tmp, self.spool_path)

    # ------------------------------------------------------------ queue
    def _enqueue(self, event, body):
        self._pending.append(body)
        self._append_spool(body)
        self._lock.notify_all()

    @property
    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event is delivered (True) or the timeout passes (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending:
                if not self._thread.is_alive():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(timeout=0.2 if remaining is None else min(remaining, 0.2))
            return True

    def close(self, timeout: float | None = 30.0) -> bool:
        """Flush for up to ``timeout`` seconds, then stop; what is left stays in the spool."""
        done = self.flush(timeout)
        self._stopping.set()
        with self._lock:
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=self.timeout + 1)
        return done

    # ------------------------------------------------------------ sending
    def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; False when stopping."""
        return not self._stopping.wait(seconds)

    def _post(self, body: str) -> tuple[int | None, str | None, str]:
        timestamp = str(int(time.time()))
        event_id = json.loads(body).get("event_id", "")
        request = urllib.request.Request(  # noqa: S310 - url scheme checked in __init__
            self.url,
            data=body.encode("utf-8"),
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": f"crucible-worker/{WORKER_VERSION}",
                "X-Crucible-Event-Id": event_id,
                "X-Crucible-Timestamp": timestamp,
                "X-Crucible-Signature": sign(self.secret, timestamp, body),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - http(s) only
                response.read()
                return response.status, None, ""
        except urllib.error.HTTPError as exc:
            detail = ""
            with contextlib.suppress(Exception):  # the body is only for the log
                detail = exc.read(500).decode("utf-8", "replace")
            return exc.code, exc.headers.get("Retry-After") if exc.headers else None, detail
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            return None, None, str(getattr(exc, "reason", exc))

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        delay = random.uniform(0, min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1)))
        asked = _retry_after_seconds(retry_after)
        if asked is not None:
            delay = max(delay, min(asked, self.retry_after_cap))
        return delay

    def _deliver(self, body: str) -> str:
        """'delivered', 'rejected' or 'retry' (still failing after max_attempts)."""
        for attempt in range(1, self.max_attempts + 1):
            status, retry_after, detail = self._post(body)
            if status is not None and 200 <= status < 300:
                return "delivered"
            self.last_failure = f"HTTP {status}" if status is not None else detail
            if status is not None and 400 <= status < 500 and status not in RETRYABLE_STATUS:
                log.error("%s %s: %s", REJECTED_MARK, status, detail[:200])
                return "rejected"
            if attempt == self.max_attempts or self._stopping.is_set():
                break
            delay = self._backoff(attempt, retry_after)
            log.warning(
                "webhook attempt %d failed (%s); retrying in %.1fs",
                attempt,
                status or detail,
                delay,
            )
            if not self._sleep(delay):
                break
        return "retry"

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._stopping.is_set():
                    self._lock.wait(timeout=1.0)
                if self._stopping.is_set():
                    return
                body = self._pending[0]
            outcome = self._deliver(body)
            with self._lock:
                if outcome in ("delivered", "rejected"):
                    if self._pending and self._pending[0] is body:
                        self._pending.popleft()
                    if outcome == "delivered":
                        self.delivered += 1
                    else:
                        self.rejected.append((body, 0))
                    if self.platform_down:
                        log.info(
                            "%s; flushing %d spooled event(s)",
                            REACHABLE_AGAIN_MARK,
                            len(self._pending),
                        )
                    self.platform_down = False
                    self._rewrite_spool()
                    self._lock.notify_all()
                    continue
                self.platform_down = True
            log.warning(
                "%s; %d event(s) spooled in %s (%s: %s)",
                UNREACHABLE_MARK,
                self.pending_count,
                self.spool_path,
                self.url,
                self.last_failure or "no answer",
            )
            if not self._sleep(self.idle_retry):
                return


def make_emitter(
    job_id: str,
    url: str | None,
    secret: str | None,
    spool_path: str | os.PathLike | None,
    **kwargs,
) -> EventEmitter:
    if not url:
        return StdoutEmitter(job_id)
    env = os.environ
    for key, name, cast in (
        ("backoff_base", "CRUCIBLE_WEBHOOK_BACKOFF_BASE", float),
        ("idle_retry", "CRUCIBLE_WEBHOOK_IDLE_RETRY", float),
        ("max_attempts", "CRUCIBLE_WEBHOOK_MAX_ATTEMPTS", int),
    ):
        if env.get(name):
            kwargs.setdefault(key, cast(env[name]))
    return WebhookEmitter(job_id, url, secret or "", spool_path, **kwargs)


class Ticker(threading.Thread):
    """A daemon thread calling ``fn()`` every ``interval`` seconds until stopped."""

    def __init__(self, interval: float, fn: Callable[[], None], name: str):
        super().__init__(name=name, daemon=True)
        self.interval, self.fn = interval, fn
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.fn()
            except Exception:
                log.exception("%s failed", self.name)

    def stop(self) -> None:
        self._stop_event.set()
