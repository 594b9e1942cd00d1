"""Structured logs: request ID, user and duration on every line; secrets never logged."""

import io
import json
import logging

import pytest
from django.test import Client, override_settings

from config.logging import (
    JsonFormatter,
    RedactSecretsFilter,
    RequestContextFilter,
    bind_context,
    clear_context,
    redact,
)
from config.roles import Role


@pytest.fixture
def json_log():
    """Capture log lines through the production formatter and filters."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    )
    handler.addFilter(RequestContextFilter())
    handler.addFilter(RedactSecretsFilter())
    root = logging.getLogger()
    # An earlier in-process Celery worker (or any library) may have raised the root level; the
    # production level is INFO, so the capture runs at INFO and restores what it found.
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(level)


def test_every_request_logs_one_json_access_line(api_as, json_log):
    client = api_as(Role.VIEWER)
    client.get("me", headers={"X-Request-ID": "req-77"})
    lines = [line for line in json_log() if line["logger"] == "crucible.access"]
    assert len(lines) == 1
    line = lines[0]
    assert line["request_id"] == "req-77"
    assert line["user"] == client.user.username
    assert line["status"] == 200 and line["method"] == "GET" and line["path"] == "/api/v1/me"
    assert isinstance(line["duration_ms"], float)
    assert line["level"] == "INFO" and "time" in line


def test_application_log_lines_carry_the_request_id(admin_api, json_log):
    admin_api.post(
        "users", json={"username": "ida", "role": "viewer"}, headers={"X-Request-ID": "r-9"}
    )
    lines = [line for line in json_log() if line["logger"] == "crucible.users"]
    assert lines and lines[0]["request_id"] == "r-9"


def test_lines_outside_a_request_have_placeholders(json_log):
    clear_context()
    logging.getLogger("crucible.test").info("hello")
    (line,) = [x for x in json_log() if x["logger"] == "crucible.test"]
    assert line["request_id"] == "-" and line["user"] == "-"


@override_settings(SECRET_KEY="s3cr3t-value-that-is-long-enough-0123456789")
def test_secrets_are_redacted_whatever_the_code_logs(json_log):
    bind_context(request_id="r", user="u")
    log = logging.getLogger("crucible.test")
    log.info("settings key is %s", "s3cr3t-value-that-is-long-enough-0123456789")
    log.info("calling with Authorization: Token 0123456789abcdef0123")
    log.info("bearer header Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig")
    log.info("connecting to redis://:hunter22@cache:6379/0 with api_key=abcd1234efgh")
    text = json.dumps(json_log())
    for secret in ("s3cr3t-value", "0123456789abcdef0123", "eyJhbGci", "hunter22", "abcd1234efgh"):
        assert secret not in text
    assert text.count("[REDACTED]") >= 5
    clear_context()


def test_tracebacks_are_redacted_too():
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, None)
    try:
        raise RuntimeError("password=topsecret123")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    RedactSecretsFilter().filter(record)
    assert "topsecret123" not in record.exc_text


def test_redact_leaves_ordinary_text_alone():
    assert redact("trained 120 steps, loss 1.23") == "trained 120 steps, loss 1.23"


def test_health_probe_in_text_mode_logs_without_error(db, caplog):
    caplog.set_level(logging.INFO, logger="crucible.access")
    Client().get("/healthz")
    assert any("GET /healthz 200" in r.getMessage() for r in caplog.records)
