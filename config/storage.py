"""The one module through which Crucible reads and writes files.

It wraps Django's default storage: local disk in the embedded mode, any S3-compatible
endpoint through django-storages when ``S3_BUCKET`` is set. Nothing else in the
project imports boto3 for storage or touches storage paths directly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from django.core.files.base import ContentFile, File
from django.core.files.storage import default_storage


def storage_is_s3() -> bool:
    return hasattr(default_storage, "bucket_name")


def storage_save(path: str, content: bytes | IO[bytes]) -> str:
    """Store ``content`` at ``path`` (replacing what was there) and return the path."""
    data = ContentFile(content) if isinstance(content, bytes) else File(content)
    if default_storage.exists(path):
        default_storage.delete(path)
    return default_storage.save(path, data)


@contextmanager
def storage_open(path: str, mode: str = "rb") -> Iterator[IO]:
    handle = default_storage.open(path, mode)
    try:
        yield handle
    finally:
        handle.close()


def storage_file(path: str) -> IO[bytes]:
    """An open binary handle for streaming (the caller, e.g. FileResponse, closes it)."""
    return default_storage.open(path, "rb")


def storage_read(path: str) -> bytes:
    with storage_open(path) as handle:
        return handle.read()


def storage_exists(path: str) -> bool:
    return default_storage.exists(path)


def storage_delete(path: str) -> None:
    default_storage.delete(path)


def storage_size(path: str) -> int:
    return default_storage.size(path)


def storage_url(path: str, *, expires: int = 3600) -> str:
    """A URL to download ``path``: pre-signed on S3, the media URL on local disk."""
    if storage_is_s3():
        return default_storage.url(path, expire=expires)
    return default_storage.url(path)


def storage_check() -> str:
    """Raise if the storage backend cannot be used; return a short description."""
    if storage_is_s3():
        client = default_storage.connection.meta.client
        client.head_bucket(Bucket=default_storage.bucket_name)
        return f"s3://{default_storage.bucket_name}"
    location = default_storage.location
    os.makedirs(location, exist_ok=True)
    if not os.access(location, os.W_OK):
        raise PermissionError(f"{location} is not writable")
    return "local disk"


def storage_uri(path: str) -> str:
    """The location of ``path`` as a worker outside Django reads it: s3:// or file://."""
    if storage_is_s3():
        key = "/".join(p for p in (default_storage.location, path) if p)
        return f"s3://{default_storage.bucket_name}/{key}"
    return Path(default_storage.path(path)).as_uri()


def storage_path_from_uri(uri: str) -> str:
    """Inverse of storage_uri: the storage path of a URI the worker reported."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not storage_is_s3() or bucket != default_storage.bucket_name:
            raise ValueError(f"{uri} is not in this platform's bucket")
        prefix = f"{default_storage.location}/" if default_storage.location else ""
        if not key.startswith(prefix):
            raise ValueError(f"{uri} is outside the storage prefix")
        return key[len(prefix) :]
    if uri.startswith("file://"):
        root = Path(default_storage.location).resolve()
        target = Path(uri[len("file://") :]).resolve()
        return str(target.relative_to(root))
    raise ValueError(f"unsupported URI {uri}")


def storage_listdir(path: str) -> tuple[list[str], list[str]]:
    """(folders, files) directly under ``path``."""
    return default_storage.listdir(path)


def storage_worker_settings() -> tuple[dict, dict]:
    """What a worker process needs to reach this storage: (spec fields, environment).

    The platform's own keys, for a worker on this machine (the local executor: same host,
    same trust). Credentials go in the environment, never into a job spec. Workers elsewhere
    (RunPod pods) get grants instead: see ``storage_presigned_get``/``storage_presigned_post``.
    """
    if not storage_is_s3():
        return {}, {}
    options = {
        "s3_endpoint_url": default_storage.endpoint_url,
        "s3_region": default_storage.region_name or "us-east-1",
    }
    env = {}
    if default_storage.access_key:
        env["AWS_ACCESS_KEY_ID"] = default_storage.access_key
    if default_storage.secret_key:
        env["AWS_SECRET_ACCESS_KEY"] = default_storage.secret_key
    return options, env


# --- Grants for workers on other machines ----------------------------------------------------
# A RunPod pod gets no keys: presigned GET URLs for what it reads and a presigned POST policy
# for what it writes, restricted to its job's prefix, both expiring with the job. S3 checks
# the signature and the policy's conditions; the platform's secret never leaves this process.

POST_MAX_BYTES = 5 * 1024**3  # S3's limit for one POST upload
GRANT_MAX_SECONDS = 7 * 24 * 3600  # SigV4 presigned requests live at most 7 days


def _s3_key(path: str) -> str:
    return "/".join(p for p in (default_storage.location, path.strip("/")) if p)


def _s3_client():
    """A client with the storage's endpoint and keys that signs with SigV4 (grants need it:
    expiry is part of the signature, and every S3-compatible store accepts it)."""
    import boto3
    from botocore.config import Config

    keys = {}
    if default_storage.access_key:
        keys = {
            "aws_access_key_id": default_storage.access_key,
            "aws_secret_access_key": default_storage.secret_key,
        }
    return boto3.client(
        "s3",
        endpoint_url=default_storage.endpoint_url or None,
        region_name=default_storage.region_name or "us-east-1",
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": default_storage.addressing_style or "auto"},
        ),
        **keys,
    )


def storage_presigned_get(path: str, *, expires: int) -> str:
    """A URL that reads ``path`` (and nothing else) for ``expires`` seconds. S3 only."""
    return _s3_client().generate_presigned_url(
        "get_object",
        Params={"Bucket": default_storage.bucket_name, "Key": _s3_key(path)},
        ExpiresIn=min(int(expires), GRANT_MAX_SECONDS),
    )


def storage_presigned_post(prefix: str, *, expires: int, max_bytes: int = POST_MAX_BYTES) -> dict:
    """An upload grant for keys under ``prefix`` only: {"url", "fields", "key_prefix"}.

    The policy's conditions are a ``starts-with`` on the key (the job's folder), the size
    range and the bucket; the worker adds ``key`` (under ``key_prefix``) and ``file``. S3
    refuses any other key, a larger file or a use after ``expires`` seconds."""
    key_prefix = _s3_key(prefix).rstrip("/") + "/"
    post = _s3_client().generate_presigned_post(
        Bucket=default_storage.bucket_name,
        # Ending in ${filename}, boto3 writes the key condition as a starts-with.
        Key=key_prefix + "${filename}",
        Conditions=[
            ["starts-with", "$key", key_prefix],
            ["content-length-range", 0, int(max_bytes)],
        ],
        ExpiresIn=min(int(expires), GRANT_MAX_SECONDS),
    )
    fields = {k: v for k, v in post["fields"].items() if k != "key"}
    return {"url": post["url"], "fields": fields, "key_prefix": key_prefix}


def storage_tree(prefix: str) -> dict[str, int]:
    """Every file under ``prefix`` (recursive): {path relative to prefix: size in bytes}."""
    prefix = prefix.strip("/")
    if storage_is_s3():
        full = _s3_key(prefix) + "/"
        found = {}
        paginator = default_storage.connection.meta.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=default_storage.bucket_name, Prefix=full):
            for item in page.get("Contents", []):
                found[item["Key"][len(full) :]] = int(item["Size"])
        return found
    root = Path(default_storage.path(prefix))
    if not root.is_dir():
        return {}
    return {
        p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()
    }
