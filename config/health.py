"""Liveness and readiness.

``/healthz`` says the process answers. ``/readyz`` checks the database, the broker, the
cache and the storage, each in its own thread with a short timeout, so one hung
dependency cannot hang the probe; it names every part that is degraded.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from django.conf import settings
from django.core.cache import cache
from django.db import connections

from config.storage import storage_check

CHECK_TIMEOUT_S = 3.0


def check_database() -> str:
    connection = connections["default"]
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        return connection.vendor
    finally:
        # Each check runs in a short-lived thread: don't leave its connection behind.
        connection.close()


def check_broker() -> str:
    from config.celery import app

    url = app.conf.broker_url or ""
    if url.startswith("filesystem"):
        folder = Path(app.conf.broker_transport_options["data_folder_in"])
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"{folder} is not writable")
        return "filesystem"
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT_S)
        return conn.transport_cls if isinstance(conn.transport_cls, str) else "broker"


def check_cache() -> str:
    key = f"readyz:{uuid.uuid4().hex}"
    cache.set(key, "1", timeout=10)
    if cache.get(key) != "1":
        raise RuntimeError("a value written to the cache could not be read back")
    cache.delete(key)
    return settings.CACHES["default"]["BACKEND"].rsplit(".", 2)[-2]


CHECKS: dict[str, Callable[[], str]] = {
    "database": check_database,
    "broker": check_broker,
    "cache": check_cache,
    "storage": storage_check,
}


def _timed(fn: Callable[[], str]) -> dict:
    started = time.perf_counter()
    try:
        detail = fn()
        status = "ok"
    except Exception as exc:
        # The reason, never credentials: exception texts of these clients carry no secrets,
        # and the log filter redacts URLs with passwords anyway.
        detail = f"{type(exc).__name__}: {exc}"[:300]
        status = "down"
    return {
        "status": status,
        "latency_ms": round((time.perf_counter() - started) * 1000, 1),
        "detail": detail,
    }


def providers() -> dict:
    """GPU providers: configured or not, and how the last real call went. Never calls out, so
    a probe costs nothing and a provider outage does not make this process unready."""
    runpod = {"configured": bool(settings.RUNPOD_API_KEY)}
    if runpod["configured"]:
        try:
            last = cache.get("runpod:last-call")  # written by training/executors/runpod.py
        except Exception:
            last = None
        runpod["last_call"] = last
        runpod["detail"] = (
            "configured; no API call yet"
            if not last
            else f"configured; last call ({last['what']}) {'ok' if last['ok'] else 'failed'} "
            f"at {last['at']}" + (f": {last['error']}" if last.get("error") else "")
        )
    else:
        runpod["detail"] = "not configured (RUNPOD_API_KEY unset): local executor only"
    return {"runpod": runpod}


# Status of parts that apps own (config imports no app): an app registers a function in its
# AppConfig.ready(), e.g. the model gateway's circuit breakers. Shown on /readyz and the
# dashboard; like ``providers()``, an outside service's trouble never makes this process unready.
STATUS_SOURCES: dict[str, Callable[[], dict]] = {}


def register_status(name: str, fn: Callable[[], dict]) -> None:
    """Show ``fn()`` (a JSON-able dict, cheap: no outside calls) under ``components[name]``."""
    STATUS_SOURCES[name] = fn


def _component(fn: Callable[[], dict]) -> dict:
    try:
        return fn()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def readiness(timeout: float = CHECK_TIMEOUT_S) -> dict:
    pool = ThreadPoolExecutor(
        max_workers=len(CHECKS) + len(STATUS_SOURCES), thread_name_prefix="readyz"
    )
    futures = {name: pool.submit(_timed, fn) for name, fn in CHECKS.items()}
    parts = {name: pool.submit(_component, fn) for name, fn in STATUS_SOURCES.items()}
    wait([*futures.values(), *parts.values()], timeout=timeout)
    pool.shutdown(wait=False, cancel_futures=True)
    components = {
        name: future.result() if future.done() else {"error": f"no answer within {timeout:g} s"}
        for name, future in parts.items()
    }
    checks = {}
    for name, future in futures.items():
        if future.done():
            checks[name] = future.result()
        else:
            checks[name] = {
                "status": "down",
                "latency_ms": None,
                "detail": f"no answer within {timeout:g} s",
            }
    degraded = [name for name, result in checks.items() if result["status"] != "ok"]
    return {
        "status": "degraded" if degraded else "ok",
        "degraded": degraded,
        "checks": checks,
        "providers": providers(),
        "components": components,
    }


def public_view(result: dict) -> dict:
    """What an anonymous caller (a load balancer, a status page) sees of ``readiness()``: the
    status of each part only. Exception texts, host names, URLs and bucket names stay with
    signed-in admins: they map the deployment for anyone who asks."""
    return {
        "status": result["status"],
        "degraded": result["degraded"],
        "checks": {name: {"status": check["status"]} for name, check in result["checks"].items()},
        "providers": {
            name: {"configured": bool(provider.get("configured"))}
            for name, provider in result["providers"].items()
        },
        "components": {
            name: {"status": "error" if "error" in part else "ok"}
            for name, part in result["components"].items()
        },
    }
