"""What the API conventions cost per request.

Subject: GET /api/v1/me (token auth, per-token rate-limit counter in the cache, schema
serialisation, request ID, access log). Baseline: GET /healthz (the bare Django stack
with the same middleware). Target: the API adds under 10 ms a request on the embedded
default; the ratio shows how much of a request the conventions are.
"""

import statistics
import time

from django.test import Client, override_settings

N = 400


def _time(client: Client, path: str, headers: dict) -> list[float]:
    for _ in range(20):  # warm-up
        client.get(path, headers=headers)
    samples = []
    for _ in range(N):
        started = time.perf_counter()
        response = client.get(path, headers=headers)
        samples.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.content
    return samples


def main() -> None:
    import logging

    from config.roles import Role
    from config.services import user_create, user_token_rotate

    logging.getLogger("crucible.access").setLevel(logging.WARNING)
    user = user_create(username="bench", role=Role.VIEWER, actor=None)
    token = user_token_rotate(user=user, actor=None)
    client = Client()
    with override_settings(API_RATE_LIMIT="1000000/m"):
        baseline = _time(client, "/healthz", {})
        subject = _time(client, "/api/v1/me", {"Authorization": f"Token {token.key}"})
    b, s = statistics.median(baseline), statistics.median(subject)
    p95 = statistics.quantiles(subject, n=20)[18]
    print(f"baseline /healthz     median {b:.2f} ms")
    print(f"subject  /api/v1/me   median {s:.2f} ms  p95 {p95:.2f} ms")
    print(f"overhead {s - b:.2f} ms a request; ratio subject/baseline = {s / b:.2f}x")
