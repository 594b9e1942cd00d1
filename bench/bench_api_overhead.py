"""What the API conventions cost per request.

Subject: GET /api/v1/me (token auth, per-token rate-limit counter in the cache, schema
serialisation, request ID, access log). Baseline: GET /healthz (the bare Django stack
with the same middleware). Target: the API adds under 10 ms a request on the embedded
default; the ratio shows how much of a request the conventions are.

Subject and baseline alternate request by request (bench/_alternate.py: the order flips every
round), N requests each after the same warm-up; every figure is the median of the same
number of requests on both sides, printed with its IQR and min-max.
"""

import os
import statistics

from django.test import Client, override_settings

from bench._alternate import alternate, spread

N = 400


def _get(client: Client, path: str, headers: dict):
    def call() -> None:
        response = client.get(path, headers=headers)
        assert response.status_code == 200, response.content

    return call


def main() -> None:
    import logging

    from config.roles import Role
    from config.services import user_create, user_token_rotate

    logging.getLogger("crucible.access").setLevel(logging.WARNING)
    user = user_create(username="bench", role=Role.VIEWER, actor=None)
    token = user_token_rotate(user=user, actor=None)
    client = Client()
    with override_settings(API_RATE_LIMIT="1000000/m"):
        healthz = _get(client, "/healthz", {})
        me = _get(client, "/api/v1/me", {"Authorization": f"Token {token.key}"})
        for _ in range(20):  # warm-up
            healthz()
            me()
        subject, baseline = alternate(me, healthz, N)
    b, s = statistics.median(baseline), statistics.median(subject)
    p95 = statistics.quantiles(subject, n=20)[18]
    b_spread = spread(baseline, unit="ms", median=False)
    s_spread = spread(subject, unit="ms", median=False)
    print(f"baseline /healthz     median {b:.2f} ms  ({b_spread})")
    print(f"subject  /api/v1/me   median {s:.2f} ms  p95 {p95:.2f} ms  ({s_spread})")
    print(
        f"overhead {s - b:.2f} ms a request; ratio subject/baseline = {s / b:.2f}x "
        f"(median of {N} each, alternating; load average {os.getloadavg()[0]:.1f})"
    )
