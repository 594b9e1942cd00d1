"""Liveness and readiness probes."""

import time

import pytest
from django.db import OperationalError
from django.db.backends.base.base import BaseDatabaseWrapper
from django.test import Client

from config import health
from config.celery import app as celery_app


def test_healthz_answers_without_touching_dependencies(django_assert_num_queries):
    with django_assert_num_queries(0):
        response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


# The checks run in their own threads with their own connections: they need committed
# data, hence transactional tests.
pytestmark = pytest.mark.django_db(transaction=True)


def _admin_client() -> Client:
    """The checks' details (exception texts) are shown to signed-in admins only."""
    from config.roles import Role
    from tests.factories import UserFactory

    client = Client()
    client.force_login(UserFactory(role=Role.ADMIN))
    return client


def test_readyz_is_200_with_every_check():
    response = _admin_client().get("/readyz")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "ok" and body["degraded"] == []
    assert set(body["checks"]) == {"database", "broker", "cache", "storage"}
    for check in body["checks"].values():
        assert check["status"] == "ok" and check["latency_ms"] is not None


def test_readyz_is_503_naming_the_broker_when_it_is_unreachable(monkeypatch):
    monkeypatch.setattr(celery_app.conf, "broker_url", "redis://127.0.0.1:1/0")
    response = _admin_client().get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded"
    assert body["degraded"] == ["broker"]
    assert body["checks"]["broker"]["status"] == "down"
    assert body["checks"]["broker"]["detail"]


def test_readyz_is_503_naming_the_database_when_it_is_unreachable(monkeypatch):
    def refuse(self):
        raise OperationalError("could not connect to server: Connection refused")

    monkeypatch.setattr(BaseDatabaseWrapper, "ensure_connection", refuse)
    # Anonymous (signing in needs the database): the status per part; the details are for
    # admins, read here from the function that builds them.
    response = Client().get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert "database" in body["degraded"]
    assert body["checks"]["database"] == {"status": "down"}
    assert "Connection refused" in health.readiness()["checks"]["database"]["detail"]


def test_a_hung_check_is_cut_off_by_its_timeout(monkeypatch):
    monkeypatch.setitem(health.CHECKS, "database", lambda: time.sleep(2) or "never")
    monkeypatch.setitem(health.CHECKS, "cache", lambda: "fine")
    monkeypatch.setitem(health.CHECKS, "broker", lambda: "fine")
    monkeypatch.setitem(health.CHECKS, "storage", lambda: "fine")
    started = time.perf_counter()
    result = health.readiness(timeout=0.2)
    assert time.perf_counter() - started < 1.5
    assert result["degraded"] == ["database"]
    assert "no answer within 0.2 s" in result["checks"]["database"]["detail"]


def test_api_system_status_requires_a_role(api_as, anon_api):
    from config.roles import Role

    assert anon_api.get("system/status").status_code == 401
    assert api_as(None).get("system/status").status_code == 403
    body = api_as(Role.VIEWER).get("system/status").json()
    assert body["status"] == "ok"
