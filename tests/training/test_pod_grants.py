"""Least privilege for RunPod pods: no storage keys, only grants.

A pod gets presigned GET URLs for the training file and the checkpoint it resumes from, and a
presigned POST policy for its job's prefix (training/executors/runpod.py ``pod_grants``,
config/storage.py). The worker (gpu/storage.py ``GrantStorage``) works with those alone.

moto's S3 server (5.x) checks neither the signature nor the conditions of a POST policy, nor
the expiry of a presigned URL: ``test_moto_alone_enforces_no_post_policy`` shows it accepting
a write outside the prefix. So the S3 server these tests talk to is moto behind
``PolicyCheckingS3``, a small front that does what AWS S3 documents for browser-based POST
uploads (SigV4 signature of the policy, expiration, every condition: bucket, starts-with,
eq, content-length-range, and every form field covered by a condition) and refuses anonymous
or expired requests, then forwards to moto. The refusals below come from that front.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import hmac
import http.client
import json
import threading
import time
import urllib.parse
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import urllib3

from config.storage import storage_path_from_uri, storage_tree
from gpu.errors import NetworkError, WorkerError
from gpu.storage import GrantStorage
from tests.training.test_runpod_recovery import loopback  # noqa: F401 - a fixture
from training.executors.runpod import pod_grants

SECRET_KEY = "testing"  # the s3_storage fixture's platform secret
REGION = "us-east-1"


def _forbidden(reason: str) -> tuple[int, bytes]:
    return 403, (
        "<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
        f"<Message>{reason}</Message></Error>"
    ).encode()


def check_post_policy(bucket: str, form: dict[str, str], file_size: int) -> str | None:
    """None when AWS S3 would accept this POST upload, else why not (AWS's documented rules)."""
    try:
        policy_b64 = form["policy"]
        policy = json.loads(base64.b64decode(policy_b64))
        credential = form["x-amz-credential"]
        signature = form["x-amz-signature"]
    except (KeyError, ValueError):
        return "policy, x-amz-credential and x-amz-signature are required"
    _, date, region, service, _ = credential.split("/")
    key = ("AWS4" + SECRET_KEY).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, policy_b64.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        return "The request signature we calculated does not match the signature you provided"
    expiration = datetime.fromisoformat(policy["expiration"].replace("Z", "+00:00"))
    if expiration < datetime.now(UTC):
        return "Invalid according to Policy: Policy expired."
    values = {**form, "bucket": bucket}
    covered = {"policy", "x-amz-signature", "file"}
    for condition in policy["conditions"]:
        if isinstance(condition, dict):
            ((name, wanted),) = condition.items()
            covered.add(name.lower())
            if values.get(name) != wanted:
                return f"Invalid according to Policy: Policy Condition failed: {name}"
            continue
        op, name, arg = condition[0].lower(), condition[1], condition[2]
        if op == "content-length-range":
            if not (int(name) <= file_size <= int(arg)):
                return "Your proposed upload exceeds the maximum allowed size"
            continue
        field = name.lstrip("$")
        covered.add(field.lower())
        value = values.get(field, "")
        if (op == "eq" and value != arg) or (op == "starts-with" and not value.startswith(arg)):
            return f'Invalid according to Policy: Policy Condition failed: ["{op}", "{name}"]'
    extra = [f for f in form if f.lower() not in covered and not f.startswith("x-ignore-")]
    if extra:
        return f"Invalid according to Policy: Extra input fields: {', '.join(extra)}"
    return None


class PolicyCheckingS3:
    """moto behind a front that enforces POST policies and presigned-URL expiry."""

    def __init__(self, upstream: str):
        self.upstream = urllib.parse.urlparse(upstream)
        self.refused: list[str] = []
        front = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self, body: bytes) -> None:
                conn = http.client.HTTPConnection(front.upstream.hostname, front.upstream.port)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"{front.upstream.hostname}:{front.upstream.port}"
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _refuse(self, reason: str) -> None:
                front.refused.append(reason)
                status, data = _forbidden(reason)
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                url = urllib.parse.urlparse(self.path)
                query = urllib.parse.parse_qs(url.query)
                content_type = self.headers.get("Content-Type", "")
                if self.command == "POST" and content_type.startswith("multipart/form-data"):
                    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                        f"Content-Type: {content_type}\r\n\r\n".encode() + body
                    )
                    form, size = {}, 0
                    for part in message.iter_parts():
                        name = part.get_param("name", header="content-disposition")
                        payload = part.get_payload(decode=True) or b""
                        if name == "file":
                            size = len(payload)
                        else:
                            form[name] = payload.decode()
                    bucket = url.path.strip("/").split("/")[0]
                    problem = check_post_policy(bucket, form, size)
                    if problem:
                        return self._refuse(problem)
                elif "X-Amz-Signature" in query:
                    signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
                    age = time.time() - signed.replace(tzinfo=UTC).timestamp()
                    if age > int(query["X-Amz-Expires"][0]):
                        return self._refuse("Request has expired")
                elif "Authorization" not in self.headers:
                    return self._refuse("Anonymous access is forbidden for this operation")
                self._forward(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def policy_s3(s3_endpoint, s3_storage, settings):
    """Default storage on a fresh bucket, reached through the policy-checking front."""
    front = PolicyCheckingS3(s3_endpoint)
    default = settings.STORAGES["default"]
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {**default, "OPTIONS": {**default["OPTIONS"], "endpoint_url": front.url}},
    }
    yield {"front": front, **s3_storage}
    front.close()


def _spec(job_prefix: str, training_path: str) -> dict:
    from config.storage import storage_uri

    return {
        "job_id": "j",
        "training_file": {"uri": storage_uri(training_path), "sha256": None},
        "output": {"uri": storage_uri(job_prefix)},
        "resume": True,
    }


def _post_raw(upload: dict, key: str, data: bytes, url: str | None = None) -> int:
    fields = [*upload["fields"].items(), ("key", key), ("file", ("f", data))]
    body, content_type = urllib3.encode_multipart_formdata(fields)
    response = urllib3.request(
        "POST", url or upload["url"], body=body, headers={"Content-Type": content_type}
    )
    return response.status


def test_a_pod_gets_grants_not_keys(policy_s3, settings):
    from config.storage import storage_save

    settings.TRAINING_MAX_DURATION_HOURS = 2
    storage_save("training/files/a.jsonl", b'{"x": 1}\n')
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "HF_TOKEN": "h"}
    spec, pod_env = pod_grants(spec=_spec("training/jobs/j1", "training/files/a.jsonl"), env=env)
    assert pod_env == {"HF_TOKEN": "h"}
    # The secret never travels: a POST policy carries the key's ID and a signature only.
    assert not {"AWS_SECRET_ACCESS_KEY", "secret_key", "aws_secret_access_key"} & set(
        json.dumps(spec).replace('"', " ").split()
    )
    assert set(spec["output"]["upload"]["fields"]) == {
        "policy",
        "x-amz-algorithm",
        "x-amz-credential",
        "x-amz-date",
        "x-amz-signature",
    }
    url = spec["training_file"]["uri"]
    assert url.startswith(policy_s3["front"].url) and "X-Amz-Signature=" in url
    assert "X-Amz-Expires=7200" in url
    upload = spec["output"]["upload"]
    policy = json.loads(base64.b64decode(upload["fields"]["policy"]))
    assert ["starts-with", "$key", "training/jobs/j1/"] in policy["conditions"]
    assert {"bucket": policy_s3["bucket"]} in policy["conditions"]
    expires = datetime.fromisoformat(policy["expiration"].replace("Z", "+00:00"))
    assert 7100 < (expires - datetime.now(UTC)).total_seconds() <= 7200
    assert spec["output"]["resume_files"] == {}  # nothing to resume from yet


def test_the_worker_writes_its_prefix_and_s3_refuses_any_other_key(policy_s3):
    spec, _ = pod_grants(spec=_spec("training/jobs/j2", "training/files/b.jsonl"), env={})
    output = spec["output"]
    storage = GrantStorage(output["uri"], output["upload"])
    storage.put_bytes(b"adapter", "adapter/adapter_model.safetensors")
    assert storage_tree("training/jobs/j2") == {"adapter/adapter_model.safetensors": 7}

    # The worker's own guard, then the S3 server's: another job's prefix, the bucket root.
    with pytest.raises(WorkerError, match="outside the job's upload grant"):
        GrantStorage(output["uri"].replace("j2", "j3"), output["upload"]).put_bytes(b"x", "a")
    for key in ("training/jobs/j3/adapter/x", "training/files/b.jsonl", "j2/x"):
        assert _post_raw(output["upload"], key, b"evil") == 403
    assert "Policy Condition failed" in policy_s3["front"].refused[-1]
    # A forged policy (the prefix widened) fails the signature check.
    forged = json.loads(base64.b64decode(output["upload"]["fields"]["policy"]))
    forged["conditions"] = [
        ["starts-with", "$key", ""]
        if isinstance(c, list) and c[:2] == ["starts-with", "$key"]
        else c
        for c in forged["conditions"]
    ]
    widened = {**output["upload"], "fields": {**output["upload"]["fields"]}}
    widened["fields"]["policy"] = base64.b64encode(json.dumps(forged).encode()).decode()
    assert _post_raw(widened, "training/files/b.jsonl", b"evil") == 403
    assert "signature" in policy_s3["front"].refused[-1]
    client = policy_s3["client"]
    keys = {
        o["Key"] for o in client.list_objects_v2(Bucket=policy_s3["bucket"]).get("Contents", [])
    }
    assert keys == {"training/jobs/j2/adapter/adapter_model.safetensors"}
    # Nothing but the grants: an unsigned read or listing is refused.
    assert urllib3.request("GET", f"{policy_s3['front'].url}/{policy_s3['bucket']}").status == 403


def test_an_expired_grant_is_refused(policy_s3, settings):
    from config.storage import storage_save

    storage_save("training/files/c.jsonl", b"{}\n")
    settings.TRAINING_MAX_DURATION_HOURS = -1 / 3600  # already expired when handed out
    spec, _ = pod_grants(spec=_spec("training/jobs/j4", "training/files/c.jsonl"), env={})
    assert urllib3.request("GET", spec["training_file"]["uri"]).status == 403
    output = spec["output"]
    with pytest.raises(NetworkError, match="HTTP 403"):
        GrantStorage(output["uri"], output["upload"]).put_bytes(b"x", "a")


def test_moto_alone_enforces_no_post_policy(s3_endpoint, policy_s3):
    """Why the front exists: moto stores a POST outside the policy's prefix."""
    spec, _ = pod_grants(spec=_spec("training/jobs/j5", "training/files/d.jsonl"), env={})
    upload = spec["output"]["upload"]
    direct = upload["url"].replace(policy_s3["front"].url, s3_endpoint)
    assert _post_raw(upload, "training/files/d.jsonl", b"evil", url=direct) in (200, 201, 204)


def test_the_pod_resumes_through_get_urls_of_every_file_of_the_newest_complete_checkpoint(
    policy_s3, tmp_path
):
    from config.storage import storage_save
    from gpu import checkpoints

    root = "training/jobs/j6/checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = f"{root}/step-{step:06d}"
        files = {"trainer_state.json": b"{}", "adapter_model.safetensors": b"w" * step}
        for name, data in files.items():
            storage_save(f"{folder}/{name}", data)
        if complete:
            manifest = {
                "step": step,
                "files": [
                    {"path": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                    for n, d in files.items()
                ],
            }
            storage_save(f"{folder}/manifest.json", json.dumps(manifest).encode())
    spec, _ = pod_grants(spec=_spec("training/jobs/j6", "training/files/e.jsonl"), env={})
    resume = spec["output"]["resume_files"]
    assert sorted(resume) == [
        f"checkpoints/step-000004/{n}"
        for n in ("adapter_model.safetensors", "manifest.json", "trainer_state.json")
    ]
    storage = GrantStorage(spec["output"]["uri"], spec["output"]["upload"], resume)
    step, local, _ = checkpoints.fetch_latest_complete(storage, tmp_path)
    assert step == 4 and (local / "adapter_model.safetensors").read_bytes() == b"wwww"
    assert storage_path_from_uri(storage.uri("adapter")) == "training/jobs/j6/adapter"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_preempted_pod_resumes_from_its_checkpoint_through_get_urls(policy_s3, loopback):  # noqa: F811
    """The real worker in a loopback pod, S3 behind the policy front, no keys in its env.

    Preempted after its first checkpoint, the relaunched pod resumes from it with the
    presigned GET URLs alone (it cannot list or read the bucket) and completes, having
    written only under its own prefix. (One run covers both the plain completion with grants
    and the resume: a second, unpreempted run would add two minutes and no claim.)"""
    from tests.training.test_runpod_recovery import (
        TINY,
        newest_complete_checkpoint,
        runpod_job,
        wait_for,
    )
    from training.models import JobStatus, WebhookEvent

    job = runpod_job(spot=True, name="grants-resume")
    pod = loopback.pods[job.executor_ref]
    assert not any(k.startswith("AWS_") for k in pod.env), sorted(pod.env)
    job = wait_for(loopback, job.pk, lambda j: j.checkpoints.exists() or j.is_terminal)
    assert not job.is_terminal, (job.error_type, job.error_message)
    first_pod = job.executor_ref
    loopback.preempt(first_pod, mode="gone")
    killed_at = newest_complete_checkpoint(job)
    job = wait_for(
        loopback,
        job.pk,
        lambda j: (
            j.is_terminal or (j.executor_ref != first_pod and j.executor_ref in loopback.pods)
        ),
    )
    if not job.is_terminal:  # the relaunched pod got grants, not keys, too
        relaunched = loopback.pods[job.executor_ref]
        assert not any(k.startswith("AWS_") for k in relaunched.env), sorted(relaunched.env)
    job = wait_for(loopback, job.pk, lambda j: j.is_terminal, timeout=400)
    assert job.status == JobStatus.COMPLETED, (job.error_type, job.error_message)
    checks = [
        e.payload["data"]
        for e in WebhookEvent.objects.filter(job=job, type="resume_check").order_by("received_at")
    ]
    assert [c["resumed_from_step"] for c in checks] == [killed_at] and checks[0]["passed"]
    assert job.current_step == TINY["max_steps"]
    stored = storage_tree(storage_path_from_uri(job.output_uri))
    assert "adapter/adapter_model.safetensors" in stored
    assert any(k.startswith("checkpoints/step-") for k in stored)
    assert not policy_s3["front"].refused, policy_s3["front"].refused
