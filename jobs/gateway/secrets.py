"""Encryption of provider API keys at rest (Fernet from ``cryptography``).

The key comes from ``GATEWAY_SECRET_KEY`` (a Fernet key), else from the file named by
``CRUCIBLE_SECRET_KEY_FILE``, else from ``<DATA_DIR>/gateway.key``, generated once (0600),
like Django's own embedded secret key. Keys are never logged or shown back.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings


class SecretKeyError(Exception):
    pass


def _key_file() -> Path:
    named = os.environ.get("CRUCIBLE_SECRET_KEY_FILE", "")
    return Path(named) if named else Path(settings.DATA_DIR) / "gateway.key"


@functools.cache
def _fernet() -> Fernet:
    raw = os.environ.get("GATEWAY_SECRET_KEY", "").strip()
    if not raw:
        path = _key_file()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL: two processes starting at once cannot write two different keys.
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(Fernet.generate_key())
        raw = path.read_text().strip()
    try:
        return Fernet(raw.encode())
    except (ValueError, TypeError) as exc:
        raise SecretKeyError(
            "GATEWAY_SECRET_KEY (or the gateway key file) is not a valid Fernet key; "
            "generate one with cryptography.fernet.Fernet.generate_key()."
        ) from exc


def encrypt(raw: str) -> str:
    return _fernet().encrypt(raw.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        # No chained exception: nothing of the token or key reaches a traceback.
        raise SecretKeyError(
            "A stored API key cannot be decrypted with the current gateway key; "
            "enter the key again on the gateway settings page."
        ) from None


def reset_cache() -> None:
    _fernet.cache_clear()
