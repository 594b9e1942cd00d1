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

    Credentials go in the environment, never into a job spec.
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
