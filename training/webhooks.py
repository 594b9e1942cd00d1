"""Signature checks of the worker's webhooks (see gpu/PROTOCOL.md, section 4)."""

from __future__ import annotations

import hashlib
import hmac
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
