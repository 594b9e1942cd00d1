"""The API's conventions: one error envelope, 401/403 on every route, request IDs."""

import re

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from config import services
from config.api import api
from config.roles import Role
from tests.conftest import assert_envelope

User = get_user_model()
WRITE_METHODS = {"post", "put", "patch", "delete"}


def _routes():
    """Every operation in the OpenAPI schema, with path parameters filled in."""
    schema = api.get_openapi_schema()
    routes = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            url = path
            for param in operation.get("parameters", []):
                if param["in"] == "path":
                    fmt = param["schema"].get("format")
                    value = "00000000-0000-0000-0000-000000000000" if fmt == "uuid" else "1"
                    url = url.replace("{" + param["name"] + "}", value)
            schemes = {name for req in operation.get("security", []) for name in req}
            routes.append((method, url, bool(schemes), schemes))
    assert routes, "the API has no routes"
    return routes


ROUTES = _routes()
PROTECTED = [(m, u) for m, u, secured, _ in ROUTES if secured]
# Routes signed by a worker (HMAC) rather than a user's token have no role to check.
SIGNED = {"WebhookSignature"}
WRITES = [
    (m, u) for m, u, secured, s in ROUTES if secured and m in WRITE_METHODS and not s & SIGNED
]


def test_every_route_but_none_is_protected():
    assert len(PROTECTED) == len(ROUTES)


@pytest.mark.parametrize(("method", "url"), PROTECTED)
def test_anonymous_gets_401_envelope_on_every_route(anon_api, method, url):
    response = anon_api.request(method, url, json={})
    error = assert_envelope(response, 401, "not_authenticated")
    assert "Authorization: Token" in error["message"]
    assert response["WWW-Authenticate"].startswith("Token")


@pytest.mark.parametrize(("method", "url"), WRITES)
def test_viewer_write_gets_403_envelope_on_every_write_route(api_as, method, url):
    viewer = api_as(Role.VIEWER)
    before = User.objects.count()
    response = viewer.request(method, url, json={})
    assert_envelope(response, 403, "permission_denied")
    assert User.objects.count() == before


@pytest.mark.parametrize("scheme", ["Token", "Bearer", "token", "bearer"])
def test_token_and_bearer_schemes_are_accepted(api_as, scheme):
    client = api_as(Role.VIEWER, scheme=scheme)
    response = client.get("me")
    assert response.status_code == 200
    assert response.json()["username"] == client.user.username
    assert response.json()["role"] == "viewer"


@pytest.mark.parametrize("header", ["Basic abc", "Token", "Token not-a-real-key", "Bearer  "])
def test_bad_credentials_get_401(db, header):
    response = Client().get("/api/v1/me", headers={"Authorization": header})
    assert_envelope(response, 401, "not_authenticated")


def test_inactive_users_token_is_refused(api_as):
    client = api_as(Role.ENGINEER)
    client.user.is_active = False
    client.user.save()
    assert_envelope(client.get("me"), 401)


def test_unknown_api_route_is_404_envelope(admin_api):
    assert_envelope(admin_api.get("/api/v1/no-such-thing"), 404, "not_found")


def test_missing_object_is_404_envelope(admin_api):
    error = assert_envelope(admin_api.get("users/999999"), 404, "not_found")
    assert "999999" in error["message"]


def test_wrong_method_is_405_envelope(admin_api):
    response = admin_api.request("DELETE", "me")
    assert_envelope(response, 405)


def test_invalid_body_is_422_envelope_with_field_details_and_writes_nothing(admin_api):
    before = User.objects.count()
    response = admin_api.post("users", json={"username": "has space", "role": "wizard"})
    error = assert_envelope(response, 422, "validation_error")
    locs = {".".join(f["loc"]) for f in error["details"]["fields"]}
    assert any(loc.endswith("username") for loc in locs)
    assert any(loc.endswith("role") for loc in locs)
    assert User.objects.count() == before


def test_malformed_json_is_400_envelope(admin_api):
    response = admin_api._client.post(
        "/api/v1/users",
        data="{not json",
        content_type="application/json",
        headers=admin_api._headers,
    )
    assert_envelope(response, 400, "bad_request")


def test_conflict_is_409_envelope_and_writes_nothing(admin_api):
    admin_api.post("users", json={"username": "grace", "role": "analyst"})
    before = User.objects.count()
    response = admin_api.post("users", json={"username": "GRACE", "role": "viewer"})
    error = assert_envelope(response, 409, "conflict")
    assert "grace" in error["message"].lower()
    assert User.objects.count() == before


def test_server_error_is_500_envelope_without_stack_trace(admin_api, monkeypatch, caplog):
    def explode(**kwargs):
        raise RuntimeError("database password is hunter2")

    monkeypatch.setattr(services, "user_create", explode)
    response = admin_api.post("users", json={"username": "linus", "role": "viewer"})
    error = assert_envelope(response, 500, "server_error")
    text = response.content.decode()
    assert "Traceback" not in text and "hunter2" not in text and "RuntimeError" not in text
    assert "request ID" in error["message"]
    # The traceback is logged, tagged with the same request ID.
    logged = [r for r in caplog.records if r.name == "crucible.api"]
    assert logged and logged[0].exc_info


def test_request_id_round_trips(admin_api):
    response = admin_api.get("me", headers={"X-Request-ID": "trace-42.abc"})
    assert response["X-Request-ID"] == "trace-42.abc"
    error = assert_envelope(admin_api.get("users/424242", headers={"X-Request-ID": "r-1"}), 404)
    assert error["request_id"] == "r-1"


def test_request_id_is_made_when_missing_or_unsafe(db):
    made = Client().get("/healthz")["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    unsafe = Client().get("/healthz", headers={"X-Request-ID": "bad id\n<script>"})
    assert unsafe["X-Request-ID"] != "bad id\n<script>"
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe["X-Request-ID"])


def test_openapi_and_docs_are_served(db):
    client = Client()
    schema = client.get("/api/v1/openapi.json")
    assert schema.status_code == 200
    assert schema.json()["info"]["title"] == "Crucible API"
    docs = client.get("/api/v1/docs")
    assert docs.status_code == 200
    assert b"swagger" in docs.content.lower()
    assert b"cdn" not in docs.content.lower()


def test_session_auth_works_for_the_dashboard_and_checks_csrf(db):
    from tests.factories import PASSWORD, UserFactory

    user = UserFactory(role=Role.ADMIN)
    client = Client(enforce_csrf_checks=True)
    assert client.login(username=user.username, password=PASSWORD)
    assert client.get("/api/v1/me").json()["username"] == user.username
    # A signed-in browser without the CSRF token cannot write.
    response = client.post(
        "/api/v1/users", data={"username": "x", "role": "viewer"}, content_type="application/json"
    )
    assert_envelope(response, 403)
