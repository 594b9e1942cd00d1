"""Helpers for tests that start real worker processes on the test's own database and broker
(a killed worker, a restarted service): wait for a condition, the database URL a subprocess
needs to reach the test database, and fresh broker connection pools for the next worker."""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import quote


def wait_until(predicate: Callable, timeout: float, what: str, interval: float = 0.25):
    """``predicate()``'s first truthy value, polled every ``interval`` s; AssertionError
    naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def database_url() -> str:
    """The test database as a DATABASE_URL for a worker subprocess."""
    from django.db import connection

    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = f"{quote(db['USER'] or '')}:{quote(str(db['PASSWORD'] or ''))}@"
    return f"postgres://{auth}{db['HOST'] or 'localhost'}:{db['PORT'] or 5432}/{db['NAME']}"


def reset_broker_pools() -> None:
    """Drop this process's broker connections (the next publish opens a fresh one on the
    broker settings the test just set)."""
    from kombu import pools

    from config.celery import app

    app.pool.force_close_all()
    app._pool = None
    app.amqp._producer_pool = None
    pools.reset()
