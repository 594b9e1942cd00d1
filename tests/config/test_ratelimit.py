"""Per-token rate limits on a counter shared through the cache."""

from django.test import override_settings
from django_ratelimit.core import get_usage

from config.ratelimit import _client_key
from config.roles import Role
from tests.conftest import ApiClient, assert_envelope


@override_settings(API_RATE_LIMIT="3/m")
def test_token_over_its_rate_gets_429_with_retry_after(api_as):
    client = api_as(Role.VIEWER)
    for _ in range(3):
        assert client.get("me").status_code == 200
    response = client.get("me")
    error = assert_envelope(response, 429, "rate_limited")
    retry_after = int(response["Retry-After"])
    assert 1 <= retry_after <= 60
    assert error["details"] == {"limit": 3, "retry_after": retry_after}


@override_settings(API_RATE_LIMIT="2/m")
def test_limits_are_per_token(api_as):
    first, second = api_as(Role.VIEWER), api_as(Role.VIEWER)
    for _ in range(2):
        first.get("me")
    assert first.get("me").status_code == 429
    assert second.get("me").status_code == 200


@override_settings(API_RATE_LIMIT="2/m")
def test_counter_lives_in_the_shared_cache(api_as):
    """Two separate clients (as two processes would) count against one number."""
    client = api_as(Role.VIEWER)
    client.get("me")

    class _Request:
        api_token = client.token
        META: dict = {}
        method = "GET"

    usage = get_usage(
        _Request(), group="api", key=_client_key, rate="2/m", method=get_usage.ALL, increment=False
    )
    assert usage["count"] == 1
    other_process = ApiClient(client.token)
    assert other_process.get("me").status_code == 200
    assert_envelope(client.get("me"), 429)
