"""This platform's own address: the base of every link it prints and of the workers' webhooks.

``CRUCIBLE_PUBLIC_URL`` wins when it is set. Otherwise the address comes from where the web
server actually answers: every web process notes the loopback address of the socket it serves
(``http://127.0.0.1:<SERVER_PORT>``) in the shared cache, at most once a minute, and a launch of
a local worker probes those addresses' ``/healthz`` (newest first) and uses the first that
answers. So ``runserver 0.0.0.0:9000``, ``make demo PORT=8765`` or a test's live server on a
random port all get webhooks that arrive, with no setting.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

from django.conf import settings
from django.core.cache import cache

logger = logging.getLogger("crucible.addresses")

DEFAULT_LOCAL_URL = "http://127.0.0.1:8000"  # runserver's default, when nothing else is known
CACHE_KEY = "crucible:served-addresses"
NOTE_EVERY_S = 60.0
KEEP = 5  # addresses remembered (newest first)
CACHE_TIMEOUT_S = 30 * 24 * 3600
PROBE_TIMEOUT_S = 2.0
WEBHOOK_SUFFIX = "/training/webhook"

_noted: dict[str, float] = {}  # per process: address -> when it was last written


def explicit_public_url() -> str:
    """``CRUCIBLE_PUBLIC_URL`` without a trailing slash, or "" when it is not set."""
    return (getattr(settings, "CRUCIBLE_PUBLIC_URL", "") or "").strip().rstrip("/")


def served_address_from_meta(meta: dict) -> str | None:
    """The loopback address of the socket a request came in on; None for the test client."""
    if meta.get("SERVER_NAME") == "testserver":  # django.test.Client: no socket at all
        return None
    if str(meta.get("PATH_INFO") or "").rstrip("/").endswith(WEBHOOK_SUFFIX):
        # A worker reporting to an address it was given teaches nothing, and the `train`
        # command's temporary receiver (gone when it exits) must not become "the" address.
        return None
    port = str(meta.get("SERVER_PORT") or "")
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    scheme = meta.get("wsgi.url_scheme") or "http"  # the socket's own scheme, not the proxy's
    return f"{scheme}://127.0.0.1:{int(port)}"


def note_served_address(meta: dict) -> None:
    """Remember (in the shared cache) that this process answers at the request's address.

    Never raises: a request is never refused because the note could not be written.
    """
    address = served_address_from_meta(meta)
    if address is None:
        return
    now = time.time()
    if now - _noted.get(address, 0.0) < NOTE_EVERY_S:
        return
    _noted[address] = now
    try:
        seen = dict(cache.get(CACHE_KEY) or {})
        seen[address] = now
        newest = sorted(seen.items(), key=lambda item: item[1], reverse=True)[:KEEP]
        cache.set(CACHE_KEY, dict(newest), timeout=CACHE_TIMEOUT_S)
    except Exception as exc:  # a cache that is down (or not allowed, in a test) costs nothing
        _noted.pop(address, None)
        logger.debug("could not note the served address %s: %s", address, exc)


def served_addresses() -> list[str]:
    """Addresses web processes noted, newest first."""
    try:
        seen = cache.get(CACHE_KEY) or {}
    except Exception as exc:
        logger.warning("could not read the served addresses: %s", exc)
        return []
    return [a for a, _ in sorted(seen.items(), key=lambda item: item[1], reverse=True)]


def public_base_url() -> str:
    """The base of every link the product prints (emails, Slack, hints), without a slash."""
    explicit = explicit_public_url()
    if explicit:
        return explicit
    served = served_addresses()
    return served[0] if served else DEFAULT_LOCAL_URL


def absolute_url(path: str) -> str:
    """``path`` (from ``django.urls.reverse``) on the public base address."""
    return public_base_url() + "/" + path.lstrip("/")


def answers_healthz(base_url: str, *, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when ``<base_url>/healthz`` answers 200 with Crucible's ``{"status": "ok"}``."""
    url = base_url.rstrip("/") + "/healthz"
    if not url.startswith(("http://", "https://")):
        return False
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http(s) only
            if response.status != 200:
                return False
            return json.loads(response.read(1000) or b"{}").get("status") == "ok"
    except (urllib.error.URLError, OSError, ValueError, TimeoutError):
        return False


def local_worker_base_url() -> str | None:
    """The address a worker on this machine reaches the platform at, verified by a probe.

    ``CRUCIBLE_PUBLIC_URL`` when set (and answering); else the newest noted address that
    answers, then runserver's default. None when nothing answers.
    """
    explicit = explicit_public_url()
    candidates = [explicit] if explicit else [*served_addresses(), DEFAULT_LOCAL_URL]
    for candidate in dict.fromkeys(candidates):
        if answers_healthz(candidate):
            return candidate
    return None


def is_private_address(url: str) -> bool:
    """True when ``url``'s host is a loopback, private or link-local address: one that a
    machine elsewhere (a RunPod pod) cannot reach. A name that does not resolve here is not
    judged (split DNS)."""
    host = urlparse(url).hostname or ""
    if not host or host == "localhost" or host.endswith(".localhost") or host.endswith(".local"):
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    for raw in addresses:
        ip = ipaddress.ip_address(raw.split("%", 1)[0])
        if ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified:
            return True
    return False
