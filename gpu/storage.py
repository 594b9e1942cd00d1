"""The output location (a local folder or an S3 prefix) and fetching input files by URI."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from gpu.errors import DatasetFormatError, NetworkError, WorkerError

CHUNK = 1024 * 1024


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_uri_to_path(uri: str) -> Path:
    if uri.startswith("/"):
        return Path(uri)
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "file":
        raise WorkerError(f"Not a file URI: {uri}")
    return Path(urllib.parse.unquote(parsed.path))


def split_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def s3_client(endpoint_url: str | None = None, region: str | None = None):
    """A boto3 S3 client; credentials come from the standard AWS variables."""
    import boto3
    from botocore.config import Config

    config = Config(
        # Each call rides out a short blip; a longer outage is the caller's to retry or skip
        # (checkpoints: gpu/checkpoints.py publish_checkpoint_retrying).
        retries={
            "max_attempts": int(os.environ.get("CRUCIBLE_S3_MAX_ATTEMPTS") or 8),
            "mode": "standard",
        },
        s3={"addressing_style": "path"} if endpoint_url else {},
        connect_timeout=20,
        read_timeout=120,
    )
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


class Storage:
    """Relative keys ("checkpoints/step-000100/manifest.json") under the job's output root."""

    is_local = False

    def uri(self, rel: str = "") -> str:
        raise NotImplementedError

    def put_file(self, local: str | os.PathLike, rel: str) -> None:
        raise NotImplementedError

    def put_bytes(self, data: bytes, rel: str) -> None:
        raise NotImplementedError

    def get_bytes(self, rel: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        raise NotImplementedError

    def get_file(self, rel: str, local: str | os.PathLike) -> None:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Relative keys of every file under ``prefix`` (recursive), sorted."""
        raise NotImplementedError

    def put_tree(self, local_dir: str | os.PathLike, rel_dir: str) -> list[str]:
        local_dir = Path(local_dir)
        keys = []
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            key = f"{rel_dir.rstrip('/')}/{path.relative_to(local_dir).as_posix()}"
            self.put_file(path, key)
            keys.append(key)
        return keys


class LocalStorage(Storage):
    is_local = True

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, rel: str) -> Path:
        path = (self.root / rel).resolve()
        if self.root.resolve() not in (path, *path.parents):
            raise WorkerError(f"Key escapes the output folder: {rel}")
        return path

    def uri(self, rel: str = "") -> str:
        # Under the output URI as given (no symlink resolution), like the spec's own URI.
        self._path(rel)  # refuses keys that escape the output folder
        return (self.root / rel).as_uri() if rel else self.root.as_uri()

    def _atomic_write(self, rel: str, writer) -> None:
        target = self._path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                writer(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, local, rel):
        def write(handle):
            with open(local, "rb") as source:
                shutil.copyfileobj(source, handle, CHUNK)

        self._atomic_write(rel, write)

    def put_bytes(self, data, rel):
        self._atomic_write(rel, lambda handle: handle.write(data))

    def get_bytes(self, rel):
        path = self._path(rel)
        return path.read_bytes() if path.is_file() else None

    def get_file(self, rel, local):
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(rel), local)

    def list(self, prefix=""):
        base = self._path(prefix) if prefix else self.root
        if not base.exists():
            return []
        root = self.root.resolve()
        return sorted(
            p.resolve().relative_to(root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )


class S3Storage(Storage):
    def __init__(
        self, uri: str, endpoint_url: str | None = None, region: str | None = None, client=None
    ):
        self.bucket, prefix = split_s3_uri(uri)
        self.prefix = prefix.strip("/")
        self.client = client or s3_client(endpoint_url, region)

    def _key(self, rel: str) -> str:
        rel = rel.lstrip("/")
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def uri(self, rel: str = "") -> str:
        return (
            f"s3://{self.bucket}/{self._key(rel)}" if rel else f"s3://{self.bucket}/{self.prefix}"
        )

    def put_file(self, local, rel):
        self.client.upload_file(str(local), self.bucket, self._key(rel))

    def put_bytes(self, data, rel):
        self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

    def get_bytes(self, rel):
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise

    def get_file(self, rel, local):
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(self.bucket, self._key(rel), str(local))

    def list(self, prefix=""):
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(f"{self.prefix}/") if self.prefix else 0
        keys = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(item["Key"][strip:] for item in page.get("Contents", []))
        return sorted(keys)


class GrantStorage(Storage):
    """The job's S3 prefix reached with grants only, no keys (a RunPod pod).

    Writes go through a presigned POST policy whose conditions S3 checks (the key starts
    with the job's prefix, the size, the expiry); reads only through the presigned GET URLs
    the platform handed out (the checkpoint to resume from). Listing shows those keys.
    """

    def __init__(self, uri: str, upload: dict, readable: dict[str, str] | None = None):
        self.bucket, prefix = split_s3_uri(uri)
        self.prefix = prefix.strip("/")
        self.upload = upload
        self.readable = dict(readable or {})

    def _key(self, rel: str) -> str:
        rel = rel.lstrip("/")
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def uri(self, rel: str = "") -> str:
        return (
            f"s3://{self.bucket}/{self._key(rel)}" if rel else f"s3://{self.bucket}/{self.prefix}"
        )

    def _post(self, data: bytes, rel: str, attempts: int = 5) -> None:
        key = self._key(rel)
        if not key.startswith(self.upload["key_prefix"]):
            raise WorkerError(f"Key outside the job's upload grant: {key}")
        # S3 wants the policy's fields first and the file last (urllib3 is botocore's HTTP
        # client, so already installed: its multipart encoder keeps the order).
        from urllib3 import encode_multipart_formdata

        fields = [*self.upload["fields"].items(), ("key", key), ("file", (Path(key).name, data))]
        body, content_type = encode_multipart_formdata(fields)
        delay = 1.0
        for attempt in range(1, attempts + 1):
            request = urllib.request.Request(  # noqa: S310 - the grant's URL is http(s)
                self.upload["url"], data=body, headers={"Content-Type": content_type}
            )
            try:
                with urllib.request.urlopen(request, timeout=120):  # noqa: S310 - http(s) only
                    return
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode(errors="replace")
                if exc.code < 500 or attempt == attempts:
                    raise NetworkError(
                        f"Upload of {key} refused: HTTP {exc.code} {detail}"
                    ) from exc
            except (urllib.error.URLError, OSError) as exc:
                if attempt == attempts:
                    raise NetworkError(f"Could not upload {key}: {exc}") from exc
            time.sleep(delay)
            delay *= 2

    def put_file(self, local, rel):
        self._post(Path(local).read_bytes(), rel)

    def put_bytes(self, data, rel):
        self._post(data, rel)

    def get_bytes(self, rel):
        url = self.readable.get(rel.lstrip("/"))
        if url is None:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "object"
            _http_download(url, target)
            return target.read_bytes()

    def get_file(self, rel, local):
        url = self.readable.get(rel.lstrip("/"))
        if url is None:
            raise WorkerError(f"No read grant for {rel}")
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        _http_download(url, Path(local))

    def list(self, prefix=""):
        return sorted(k for k in self.readable if k.startswith(prefix))


def open_storage(
    uri: str,
    endpoint_url: str | None = None,
    region: str | None = None,
    *,
    upload: dict | None = None,
    readable: dict[str, str] | None = None,
) -> Storage:
    if uri.startswith("s3://") and upload:
        return GrantStorage(uri, upload, readable)
    if uri.startswith("s3://"):
        return S3Storage(uri, endpoint_url, region)
    return LocalStorage(file_uri_to_path(uri))


def _http_download(url: str, dest: Path, attempts: int = 4) -> None:
    delay = 1.0
    for attempt in range(1, attempts + 1):
        try:
            request = urllib.request.Request(url)  # noqa: S310 - caller checked the scheme is http(s)
            with urllib.request.urlopen(request, timeout=60) as response, open(dest, "wb") as out:  # noqa: S310 - http(s) only
                shutil.copyfileobj(response, out, CHUNK)
            return
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == attempts:
                raise NetworkError(f"Could not download {url}: HTTP {exc.code}") from exc
        except (urllib.error.URLError, OSError) as exc:
            if attempt == attempts:
                raise NetworkError(f"Could not download {url}: {exc}") from exc
        time.sleep(delay)
        delay *= 2


def fetch_uri(
    uri: str,
    workdir: Path,
    sha256: str | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> Path:
    """A local path holding the file at ``uri`` (file://, s3://, http(s)://), sha256-checked."""
    if uri.startswith(("file://", "/")):
        path = file_uri_to_path(uri)
        if not path.is_file():
            raise DatasetFormatError(f"Training file not found: {path}")
    elif uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        path = workdir / "input" / (Path(key).name or "train.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        from botocore.exceptions import ClientError

        try:
            s3_client(endpoint_url, region).download_file(bucket, key, str(path))
        except ClientError as exc:
            raise DatasetFormatError(f"Could not read the training file {uri}: {exc}") from exc
    elif uri.startswith(("http://", "https://")):
        name = Path(urllib.parse.urlparse(uri).path).name or "train.jsonl"
        path = workdir / "input" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _http_download(uri, path)
    else:
        raise DatasetFormatError(f"Unsupported training file URI: {uri}")
    if sha256:
        actual = sha256_file(path)
        if actual.lower() != sha256.lower():
            raise DatasetFormatError(
                f"Training file checksum mismatch: expected sha256 {sha256.lower()}, got {actual}",
                field="training_file.sha256",
            )
    return path
