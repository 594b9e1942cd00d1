"""Signed webhooks: HMAC checked by a local platform stand-in, retries, buffering, flushing."""

import hashlib
import hmac
import io
import json
import socket
import time

from gpu.webhooks import StdoutEmitter, WebhookEmitter, sign, verify
from tests.gpu.conftest import SECRET, WebhookSink, wait_for


def _emitter(url, spool=None, **kw):
    options = {
        "backoff_base": 0.05,
        "backoff_cap": 0.2,
        "idle_retry": 0.2,
        "max_attempts": 3,
        "timeout": 2,
    }
    options.update(kw)
    return WebhookEmitter("job-1", url, SECRET, spool, **options)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_signature_format():
    body = b'{"a":1}'
    signature = sign("k", "1700000000", body)
    assert (
        signature == "sha256=" + hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    )
    now = str(int(time.time()))
    assert verify("k", now, body, sign("k", now, body))
    assert not verify("k", now, body, sign("other", now, body))
    stale = str(int(time.time()) - 600)
    assert not verify("k", stale, body, sign("k", stale, body))  # older than 5 minutes


def test_events_are_signed_and_delivered_in_order(webhook_sink):
    emitter = _emitter(webhook_sink.url)
    for i in range(5):
        emitter.emit("metrics", {"step": i})
    assert emitter.close(10)
    assert webhook_sink.bad_signatures == 0
    assert [e["data"]["step"] for e in webhook_sink.events] == [0, 1, 2, 3, 4]
    assert [e["sequence"] for e in webhook_sink.events] == [1, 2, 3, 4, 5]
    first = webhook_sink.events[0]
    assert set(first) == {"event_id", "job_id", "type", "sequence", "created_at", "data"}
    assert first["job_id"] == "job-1" and first["type"] == "metrics"
    request = webhook_sink.requests[0]
    assert request["headers"]["X-Crucible-Event-Id"] == first["event_id"]
    assert request["headers"]["X-Crucible-Signature"] == sign(
        SECRET, request["headers"]["X-Crucible-Timestamp"], request["body"]
    )


def test_bad_secret_is_refused_by_the_platform(webhook_sink):
    emitter = WebhookEmitter("job-1", webhook_sink.url, "wrong-secret", None, max_attempts=1)
    emitter.emit("heartbeat", {"step": 0})
    emitter.close(5)
    assert webhook_sink.events == [] and webhook_sink.bad_signatures == 1
    assert len(emitter.rejected) == 1  # 401 is final, not retried forever


def test_retries_keep_the_event_id_and_honour_retry_after(webhook_sink):
    webhook_sink.fail_next = [(503, {}), (429, {"Retry-After": "1"})]
    emitter = _emitter(webhook_sink.url, max_attempts=5)
    emitter.emit("started", {"pid": 1})
    emitter.emit("stage", {"stage": "preprocessing"})
    assert emitter.close(15)
    ids = [r["headers"]["X-Crucible-Event-Id"] for r in webhook_sink.requests]
    assert ids[0] == ids[1] == ids[2] != ids[3]  # two retries of the first event, then the second
    arrivals = [r["at"] for r in webhook_sink.requests]
    assert arrivals[2] - arrivals[1] >= 0.95  # waited for Retry-After: 1
    assert [e["type"] for e in webhook_sink.events] == ["started", "stage"]


def test_a_rejected_event_does_not_block_the_rest(webhook_sink):
    webhook_sink.fail_next = [(400, {})]
    emitter = _emitter(webhook_sink.url)
    emitter.emit("warning", {"code": "x"})
    emitter.emit("heartbeat", {"step": 1})
    assert emitter.close(10)
    assert [e["type"] for e in webhook_sink.events] == ["heartbeat"]
    assert len(emitter.rejected) == 1


def test_buffered_while_the_platform_is_down_then_flushed_in_order(tmp_path):
    port = _free_port()
    spool = tmp_path / "events.spool.jsonl"
    emitter = _emitter(f"http://127.0.0.1:{port}/hook", spool)
    for i in range(6):
        emitter.emit("metrics", {"step": i})
    assert wait_for(lambda: emitter.platform_down, 10)
    lines = [json.loads(line) for line in spool.read_text().splitlines()]
    assert [e["data"]["step"] for e in lines] == list(range(6))
    assert not emitter.flush(0.3)  # nothing can be delivered yet

    sink = WebhookSink(port=port)  # the platform comes back
    try:
        assert emitter.flush(20)
        assert [e["data"]["step"] for e in sink.events] == list(range(6))
        assert [e["sequence"] for e in sink.events] == [1, 2, 3, 4, 5, 6]
        assert not spool.exists()  # everything delivered
        emitter.emit("metrics", {"step": 6})
        assert emitter.close(10)
        assert sink.events[-1]["data"]["step"] == 6 and sink.bad_signatures == 0
    finally:
        sink.close()


def test_a_spool_left_by_an_earlier_run_goes_out_first(tmp_path, webhook_sink):
    spool = tmp_path / "events.spool.jsonl"
    earlier = _emitter("http://127.0.0.1:9/never", spool, start=False)  # killed before sending
    earlier.emit("started", {"run": 1})
    earlier.emit("metrics", {"run": 1, "step": 1})
    assert len(spool.read_text().splitlines()) == 2

    later = _emitter(webhook_sink.url, spool)
    later.emit("started", {"run": 2})
    assert later.close(10)
    assert [(e["type"], e["data"]["run"]) for e in webhook_sink.events] == [
        ("started", 1),
        ("metrics", 1),
        ("started", 2),
    ]
    assert [e["sequence"] for e in webhook_sink.events] == [1, 2, 3]  # the sequence carries on
    assert not spool.exists()


def test_without_a_webhook_events_go_to_stdout():
    stream = io.StringIO()
    emitter = StdoutEmitter("job-2", stream)
    emitter.emit("heartbeat", {"step": 3, "loss": float("nan")})
    event = json.loads(stream.getvalue())
    assert event["type"] == "heartbeat" and event["data"] == {"step": 3, "loss": None}
