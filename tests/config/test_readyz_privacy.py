"""/readyz: anonymous callers see each part's status only; admins see the details."""

from __future__ import annotations

import pytest
from django.test import Client

from config import health
from config.roles import Role
from tests.factories import TokenFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

SECRET_DETAIL = "could not connect to db-7.internal.example:5432 bucket crucible-prod-artifacts"


@pytest.fixture
def broken_storage(monkeypatch):
    def refuse() -> str:
        raise ConnectionError(SECRET_DETAIL)

    monkeypatch.setitem(health.CHECKS, "storage", refuse)
    monkeypatch.setitem(health.STATUS_SOURCES, "probe", lambda: {"url": "http://10.0.0.9:8001"})


def _signed_in(role: Role) -> Client:
    client = Client()
    client.force_login(UserFactory(role=role))
    return client


@pytest.mark.parametrize("who", ["anonymous", "engineer"])
def test_non_admins_see_the_status_per_part_only(broken_storage, who):
    client = Client() if who == "anonymous" else _signed_in(Role.ENGINEER)
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded" and body["degraded"] == ["storage"]
    assert body["checks"]["storage"] == {"status": "down"}
    assert body["checks"]["database"] == {"status": "ok"}
    assert body["components"]["probe"] == {"status": "ok"}
    text = response.content.decode()
    for leak in ("db-7.internal", "crucible-prod-artifacts", "ConnectionError", "10.0.0.9"):
        assert leak not in text
    assert "detail" not in text and "latency_ms" not in text


def test_admins_see_details_by_session_or_token(broken_storage):
    for response in (
        _signed_in(Role.ADMIN).get("/readyz"),
        Client().get(
            "/readyz",
            headers={
                "Authorization": f"Token {TokenFactory(user=UserFactory(role=Role.ADMIN)).key}"
            },
        ),
    ):
        assert response.status_code == 503
        body = response.json()
        assert body["checks"]["storage"]["detail"] == f"ConnectionError: {SECRET_DETAIL}"
        assert body["components"]["probe"] == {"url": "http://10.0.0.9:8001"}


def test_an_engineer_token_gets_the_public_view(broken_storage):
    token = TokenFactory(user=UserFactory(role=Role.ENGINEER))
    body = Client().get("/readyz", headers={"Authorization": f"Token {token.key}"}).json()
    assert body["checks"]["storage"] == {"status": "down"}


def test_healthz_is_unchanged():
    response = Client().get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
