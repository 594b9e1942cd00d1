"""The storage module, on local disk and on an S3-compatible server (moto, loopback)."""

import io

import pytest
from django.core.files.storage import default_storage

from config.storage import (
    storage_check,
    storage_delete,
    storage_exists,
    storage_is_s3,
    storage_open,
    storage_read,
    storage_save,
    storage_size,
    storage_url,
)


def _round_trip():
    path = storage_save("checks/hello.txt", b"hello crucible")
    assert path == "checks/hello.txt"
    assert storage_exists(path)
    assert storage_read(path) == b"hello crucible"
    assert storage_size(path) == len(b"hello crucible")
    # Saving again replaces the object instead of making hello_abc123.txt.
    assert storage_save(path, io.BytesIO(b"second")) == path
    with storage_open(path) as handle:
        assert handle.read() == b"second"
    url = storage_url(path)
    storage_delete(path)
    assert not storage_exists(path)
    return url


def test_local_disk_round_trip(settings, tmp_path):
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(tmp_path), "base_url": "/media/"},
        },
    }
    assert not storage_is_s3()
    assert _round_trip() == "/media/checks/hello.txt"
    assert storage_check() == "local disk"


def test_s3_round_trip_with_presigned_url(s3_storage):
    assert storage_is_s3()
    url = _round_trip()
    assert s3_storage["bucket"] in url
    assert "Signature" in url  # pre-signed (SigV2 or SigV4)
    assert storage_check() == f"s3://{s3_storage['bucket']}"


def test_s3_objects_land_in_the_bucket(s3_storage):
    storage_save("adapters/job-1/adapter_config.json", b"{}")
    listed = s3_storage["client"].list_objects_v2(Bucket=s3_storage["bucket"])
    assert [o["Key"] for o in listed["Contents"]] == ["adapters/job-1/adapter_config.json"]


def test_missing_bucket_fails_the_check(s3_storage):
    s3_storage["client"].delete_bucket(Bucket=s3_storage["bucket"])
    with pytest.raises(Exception, match=r"404|NoSuchBucket|Not Found"):
        storage_check()


@pytest.mark.django_db(transaction=True)
def test_readyz_names_storage_when_the_bucket_is_gone(s3_storage):
    from django.test import Client

    s3_storage["client"].delete_bucket(Bucket=s3_storage["bucket"])
    response = Client().get("/readyz")
    assert response.status_code == 503
    assert response.json()["degraded"] == ["storage"]


def test_configured_storage_works(tmp_path):
    """Whatever this run is configured with (local disk, or S3 in CI), it round-trips."""
    path = storage_save(f"suite/{tmp_path.name}.bin", b"\x00\x01")
    assert storage_read(path) == b"\x00\x01"
    default_storage.delete(path)
