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


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """PBKDF2 is slow on purpose; tests don't need it."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible endpoint on loopback: CI's moto server, or one started here."""
    import os

    if os.environ.get("S3_ENDPOINT_URL"):
        yield os.environ["S3_ENDPOINT_URL"]
        return
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_storage(s3_endpoint, settings):
    """Point default storage at a fresh bucket on the loopback S3 server."""
    import uuid

    import boto3

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", **creds)
    client.create_bucket(Bucket=bucket)
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": bucket,
                "endpoint_url": s3_endpoint,
                "region_name": "us-east-1",
                "access_key": "testing",
                "secret_key": "testing",
                "addressing_style": "path",
                "file_overwrite": True,
                "default_acl": None,
            },
        },
    }
    yield {"bucket": bucket, "client": client}


@pytest.fixture
def local_storage(settings, tmp_path):
    """Local-disk storage for tests about local behaviour (CI's default storage is S3)."""
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(tmp_path / "media"), "base_url": "/media/"},
        },
    }
    return tmp_path / "media"


def fetch_download(response) -> bytes:
    """The bytes of a download: streamed from local disk, or from the pre-signed S3 link."""
    if response.status_code == 302:
        import urllib.request

        with urllib.request.urlopen(response["Location"], timeout=30) as remote:  # noqa: S310
            return remote.read()
    assert response.status_code == 200, response.content
    return b"".join(response.streaming_content)


@pytest.fixture(autouse=True)
def _fresh_shared_cache():
    """Each test starts with an empty shared cache where it outlives the test's transaction.

    Embedded, the cache is a database table rolled back with each test; in production mode it is
    Redis, so the gateway's stored answers, breaker states and rate windows of one test would
    otherwise answer the next (a cached reply costs 0 and is never refused by the budget).
    """
    from django.core.cache import caches

    cache = caches["default"]
    if "redis" in type(cache).__module__:
        cache.clear()
    yield
