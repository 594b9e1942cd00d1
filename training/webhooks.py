"""Signature checks of the worker's webhooks (see gpu/PROTOCOL.md, section 4)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

MAX_AGE_SECONDS = 300


def sign(secret: str, timestamp: str, body: bytes) -> str:
    message = timestamp.encode() + b"." + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_problem(
    *, secret: str, timestamp: str, body: bytes, signature: str, now: float | None = None
) -> str | None:
    """None when the signature is good and fresh, else why not (for the 401 message)."""
    if not timestamp or not signature:
        return "missing X-Crucible-Timestamp or X-Crucible-Signature"
    try:
        sent = int(timestamp)
    except ValueError:
        return "X-Crucible-Timestamp is not a Unix time"
    now = time.time() if now is None else now
    if abs(now - sent) > MAX_AGE_SECONDS:
        return f"the signature is older than {MAX_AGE_SECONDS} seconds"
    if not hmac.compare_digest(sign(secret, timestamp, body), signature):
        return "the signature does not match"
    return None


def refusal(
    *, secret: str | None, timestamp: str, body: bytes, signature: str, now: float | None = None
) -> str | None:
    """None when the event may be processed, else the 401 message.

    An unknown job (``secret`` None) is checked against a random key: it gets exactly the
    answer a known job with a wrong signature gets (and in about the same time), so a
    caller without the job's secret cannot learn whether the job exists. The reasons that
    remain (missing headers, stale timestamp, mismatch) depend only on what the caller sent.
    """
    problem = signature_problem(
        secret=secret if secret is not None else secrets.token_hex(32),
        timestamp=timestamp,
        body=body,
        signature=signature,
        now=now,
    )
    if problem is None and secret is None:  # a guessed 256-bit key: never in practice
        problem = "the signature does not match"
    return f"Webhook refused: {problem}." if problem else None
