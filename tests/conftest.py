import pytest
from django.test import Client

from config.roles import Role
from tests.factories import TokenFactory, UserFactory


class ApiClient:
    """A test client that speaks JSON to /api/v1/ with a token."""

    def __init__(self, token=None, scheme: str = "Token"):
        self.token = token
        self.user = token.user if token else None
        self._client = Client()
        self._headers = {"Authorization": f"{scheme} {token.key}"} if token else {}

    def request(self, method: str, path: str, json=None, headers=None, **kwargs):
        url = path if path.startswith("/") else f"/api/v1/{path}"
        all_headers = {**self._headers, **(headers or {})}
        call = getattr(self._client, method.lower())
        if json is not None:
            kwargs.update(data=json, content_type="application/json")
        return call(url, headers=all_headers, **kwargs)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, json=None, **kw):
        return self.request("POST", path, json=json, **kw)

    def patch(self, path, json=None, **kw):
        return self.request("PATCH", path, json=json, **kw)


@pytest.fixture
def api_as(db):
    """``api_as(Role.VIEWER)`` gives an ApiClient holding a new token of that role."""

    def make(role: Role | None, scheme: str = "Token") -> ApiClient:
        return ApiClient(TokenFactory(user=UserFactory(role=role)), scheme=scheme)

    return make


@pytest.fixture
def anon_api(db):
    return ApiClient()


@pytest.fixture
def admin_api(api_as):
    return api_as(Role.ADMIN)


def assert_envelope(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details", "request_id"}, error
    assert error["message"], error
    assert error["request_id"] == response["X-Request-ID"]
    if code:
        assert error["code"] == code, error
    return error
