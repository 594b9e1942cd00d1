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


def assert_ledger_covers_server_calls(calls, server_calls: int) -> None:
    """After a worker was killed mid-call: every call that reached the server is in the
    ledger (``calls``: the uncached ledger rows), none left in flight. A call's row is
    committed before its request leaves, so a kill between the two records an attempt the
    server never saw: the ledger may count more than the server, never fewer, and only by the
    calls settled as lost (one unsent attempt each at most). Billing errs towards the held
    cost rather than missing a call."""
    from django.db.models import Sum

    recorded = calls.aggregate(n=Sum("attempts"))["n"]
    lost = calls.filter(outcome="error:worker_lost").count()
    assert server_calls <= recorded <= server_calls + lost, (recorded, server_calls, lost)
    assert (calls.filter(outcome="ok").aggregate(n=Sum("attempts"))["n"] or 0) <= server_calls
    assert not calls.filter(outcome="in_flight").exists()
